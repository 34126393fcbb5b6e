"""Data balancing baselines: group- or class-balanced loss reweighting and resampling (`ReweightTrainer`), and
SUBG / SUBY (Idrissi et al., "Simple data balancing achieves competitive worst-group-accuracy", CLeaR 2022,
arXiv:2110.14503): every group (class) subsampled to the smallest one (`SUBGTrainer`)."""
