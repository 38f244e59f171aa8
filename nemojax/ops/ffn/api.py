"""FFN dispatch: validation and the `implementation=` switch for the relu^2 MLP."""

from __future__ import annotations

from nemojax.ops.ffn.pallas_ffn import fused_relu2_ffn
from nemojax.ops.ffn.reference import relu2_ffn

IMPLEMENTATIONS = ("xla", "pallas")


def default_implementation() -> str:
    # "xla" on every backend: the fused kernel recomputes the up projection once per output tile
    # (see pallas_ffn), so it is not known to be faster anywhere. The GPU default changes only
    # once experiments/benchmarks/kernels.py --only ffn has been run on a GPU.
    return "xla"


def ffn(x, w_up, w_down, b_up=None, b_down=None, *, implementation: str | None = None):
    """down(relu(x @ w_up + b_up)^2) + b_down; x [..., D], w_up [D, F], w_down [F, D], biases
    optional ([F], [D]). implementation: None (the default above) | "xla" | "pallas".
    The result has x's dtype; matmuls accumulate in fp32."""
    impl = implementation or default_implementation()
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"ffn: implementation must be None or one of {IMPLEMENTATIONS}; got {impl!r}")
    d = x.shape[-1]
    if w_up.ndim != 2 or w_up.shape[0] != d or w_down.shape != (w_up.shape[1], d):
        raise ValueError(f"ffn: w_up must be [D, F] and w_down [F, D] with D = x.shape[-1] = {d}; "
                         f"got w_up {w_up.shape}, w_down {w_down.shape}")
    f = w_up.shape[1]
    if b_up is not None and b_up.shape != (f,):
        raise ValueError(f"ffn: b_up must be [F] = {(f,)} or None; got {b_up.shape}")
    if b_down is not None and b_down.shape != (d,):
        raise ValueError(f"ffn: b_down must be [D] = {(d,)} or None; got {b_down.shape}")
    # Nemotron's MLPs have no biases; the kernel has none, so biased FFNs take the reference path.
    if impl == "xla" or b_up is not None or b_down is not None:
        return relu2_ffn(x, w_up, w_down, b_up, b_down)
    return fused_relu2_ffn(x.reshape(-1, d), w_up, w_down).reshape(x.shape)


__all__ = ["IMPLEMENTATIONS", "default_implementation", "ffn"]
