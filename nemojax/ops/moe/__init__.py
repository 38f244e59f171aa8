from nemojax.ops.moe.api import IMPLEMENTATIONS, default_implementation, moe_ffn, routing_stats
from nemojax.ops.moe.balance import router_z_loss, seq_aux_loss, update_correction_bias
from nemojax.ops.moe.dispatch import arrival_rank, capacity
from nemojax.ops.moe.expert_parallel import moe_ffn_expert_parallel
from nemojax.ops.moe.routing import route

__all__ = ["IMPLEMENTATIONS", "arrival_rank", "capacity", "default_implementation", "moe_ffn",
           "moe_ffn_expert_parallel", "route", "router_z_loss", "routing_stats", "seq_aux_loss",
           "update_correction_bias"]
