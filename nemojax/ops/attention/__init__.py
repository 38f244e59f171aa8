from nemojax.ops.attention.reference import attention

__all__ = ["attention"]
