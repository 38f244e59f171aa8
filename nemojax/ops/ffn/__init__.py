from nemojax.ops.ffn.api import IMPLEMENTATIONS, default_implementation, ffn
from nemojax.ops.ffn.pallas_ffn import FfnConfig, fused_relu2_ffn
from nemojax.ops.ffn.reference import relu2, relu2_ffn

__all__ = ["IMPLEMENTATIONS", "FfnConfig", "default_implementation", "ffn", "fused_relu2_ffn", "relu2", "relu2_ffn"]
