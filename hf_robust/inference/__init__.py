"""Group inference: the minority a trained model points to without group labels (`group_inference`), by JTT's
error set or GradTune's gradient norms (`rules`), reported in every run that has an ERM stage and available on any
model as `infer_groups(model, dataset, rule=...)`."""

from .group_inference import GroupInferenceHook, InferredGroups, infer_groups
from .rules import RULES, error_set, gradient_norm_set, group_table

__all__ = ["GroupInferenceHook", "InferredGroups", "RULES", "error_set", "gradient_norm_set", "group_table",
           "infer_groups"]
