from nemojax.ops.ffn.reference import relu2, relu2_ffn

__all__ = ["relu2", "relu2_ffn"]
