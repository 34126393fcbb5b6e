"""JTT (Liu et al., "Just Train Twice: Improving Group Robustness without Training Group Information", ICML 2021,
arXiv:2107.09044): ERM finds the examples it gets wrong, a second model trains with them upsampled (`config`,
`error_set`, `trainer`)."""
