"""What a run reports: the plain-text group table (`tables`), plots (`plots`) and the model card (`modelcard`)."""

from .tables import format_group_table

__all__ = ["format_group_table"]
