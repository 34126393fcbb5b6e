"""GroupDRO (Sagawa et al., "Distributionally Robust Neural Networks for Group Shifts: On the Importance of
Regularization for Worst-Case Generalization", ICLR 2020, arXiv:1911.08731): online group weights that move
towards the groups with the highest loss (`config`, `weights`, `trainer`)."""
