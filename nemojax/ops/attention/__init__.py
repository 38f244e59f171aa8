from nemojax.ops.attention.api import IMPLEMENTATIONS, attention, default_implementation

__all__ = ["IMPLEMENTATIONS", "attention", "default_implementation"]
