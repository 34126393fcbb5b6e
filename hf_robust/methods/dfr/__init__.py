"""DFR (Kirichenko et al., "Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations",
ICLR 2023, arXiv:2204.02937): a logistic head fit on group-balanced held-out features (`config`, `trainer`)."""
