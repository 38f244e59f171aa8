from nemojax.ops.moe.dispatch import moe_ffn
from nemojax.ops.moe.routing import route

__all__ = ["moe_ffn", "route"]
