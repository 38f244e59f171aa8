"""FFN dispatch: validation and the `implementation=` switch for the relu^2 MLP."""

from __future__ import annotations

from nemojax.ops.ffn.pallas_ffn import fused_relu2_ffn
from nemojax.ops.ffn.reference import check_ffn_args, relu2_ffn
from nemojax.ops.registry import lookup

# name -> function(x, w_up, w_down, b_up, b_down); a new kernel is one more entry
_BY_NAME = {"xla": relu2_ffn, "pallas": fused_relu2_ffn}
IMPLEMENTATIONS = tuple(_BY_NAME)


def default_implementation(backend: str | None = None) -> str:
    """What `implementation=None` runs on `backend` (None: jax's default): "xla" on every backend.
    The fused kernel recomputes the up projection once per output tile (see pallas_ffn), so it is
    not known to be faster anywhere; the GPU default changes only once
    experiments/benchmarks/kernels.py --only ffn has been run on a GPU."""
    del backend  # one answer for all backends until a GPU measurement gives another
    return "xla"


def ffn(x, w_up, w_down, b_up=None, b_down=None, *, implementation: str | None = None):
    """down(relu(x @ w_up + b_up)^2) + b_down; x [..., D], w_up [D, F], w_down [F, D], biases
    optional ([F], [D]). implementation: None (`default_implementation()`) | "xla" | "pallas".
    The result has x's dtype; matmuls accumulate in fp32."""
    fn = lookup("ffn", _BY_NAME, implementation, default_implementation)
    check_ffn_args("ffn", x, w_up, w_down, b_up, b_down)
    return fn(x, w_up, w_down, b_up, b_down)


__all__ = ["IMPLEMENTATIONS", "default_implementation", "ffn"]
