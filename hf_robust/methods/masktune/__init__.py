"""MaskTune (Taghanaki et al., "MaskTune: Mitigating Spurious Correlations by Forcing to Explore", NeurIPS 2022,
arXiv:2210.00055): `config`, `trainer`, the masks (`masks`: computed and stored), the label-free choice of
the fine-tuning and its rounds (`selection`) and selective classification (`selective`)."""
