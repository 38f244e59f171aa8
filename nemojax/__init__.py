"""nemojax: Nemotron hybrid Mamba/attention/MoE models, kernels, compression and NTK theory in JAX."""

from nemojax import presets
from nemojax.config import AttentionSpec, LayerSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec
from nemojax.generate import generate
from nemojax.io.hf import load_pretrained, save_pretrained
from nemojax.nn.model import HybridLM, configure_kernels, param_counts

__all__ = [
    "AttentionSpec", "HybridLM", "LayerSpec", "MLPSpec", "MambaSpec", "ModelConfig", "MoESpec", "configure_kernels",
    "generate",
    "load_pretrained", "param_counts", "presets", "save_pretrained",
]
