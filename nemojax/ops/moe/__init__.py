from nemojax.ops.moe.balance import router_z_loss, seq_aux_loss, update_correction_bias
from nemojax.ops.moe.dispatch import (IMPLEMENTATIONS, capacity, default_implementation, moe_ffn, routing_stats,
                                      slot_in_expert)
from nemojax.ops.moe.routing import route

__all__ = ["IMPLEMENTATIONS", "capacity", "default_implementation", "moe_ffn", "route", "router_z_loss",
           "routing_stats", "seq_aux_loss", "slot_in_expert", "update_correction_bias"]
