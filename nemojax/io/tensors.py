"""Checkpoint tensors: each one's name in a NemotronH-style safetensors file, where it lives in the
NNX state, and how its layout differs between the two."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp


@dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: its HF name, where it lives in the NNX state, and how it is laid out."""

    name: str
    path: tuple
    layout: str  # "copy" | "t" (2-D transpose) | "conv" ([C,1,K] <-> [K,C]) | "experts" (swap last two axes)

    def to_nnx(self, t):
        if self.layout == "t":
            return t.T
        if self.layout == "conv":
            return t[:, 0, :].T
        if self.layout == "experts":
            return jnp.swapaxes(t, -1, -2)
        return t

    def to_hf(self, a):
        if self.layout == "conv":
            return a.T[:, None, :]
        return self.to_nnx(a)  # the other layouts are involutions

    def hf_shape(self, nnx_shape):
        if self.layout == "t":
            return nnx_shape[::-1]
        if self.layout == "conv":
            return (nnx_shape[1], 1, nnx_shape[0])
        if self.layout == "experts":
            return (*nnx_shape[:-2], nnx_shape[-1], nnx_shape[-2])
        return tuple(nnx_shape)


def linear_entries(name: str, path: tuple, bias: bool) -> list[Entry]:
    """A `Linear` (kernel [in, out]) as torch's nn.Linear stores it (weight [out, in], bias)."""
    out = [Entry(f"{name}.weight", (*path, "kernel"), "t")]
    return out + ([Entry(f"{name}.bias", (*path, "bias"), "copy")] if bias else [])
