"""Group-annotated datasets: the data model, benchmark loaders and the embedded benchmarks."""

from .benchmarks import BENCHMARKS, has_negation, load_benchmark, sagawa_has_negation
from .core import (
    DataValidationError,
    as_group_dataset,
    group_names,
    input_kind,
    label_names,
    validate_group_dataset,
)
from .biased_mnist import make_biased_mnist
from .overlapping import add_overlapping_groups
from .embedded import make_biased_digits, make_spurious_text

__all__ = [
    "BENCHMARKS",
    "DataValidationError",
    "add_overlapping_groups",
    "as_group_dataset",
    "group_names",
    "has_negation",
    "input_kind",
    "label_names",
    "load_benchmark",
    "make_biased_digits",
    "make_biased_mnist",
    "make_spurious_text",
    "sagawa_has_negation",
    "validate_group_dataset",
]
