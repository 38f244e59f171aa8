from nemojax.nn.attention import Attention
from nemojax.nn.ffn import MLP, MoE
from nemojax.nn.layers import CorrectionBias, Linear, RMSNorm
from nemojax.nn.mamba import Mamba2Mixer
from nemojax.nn.model import Block, HybridLM, MTPDepth

__all__ = ["Attention", "Block", "CorrectionBias", "HybridLM", "Linear", "MLP", "MoE", "MTPDepth", "Mamba2Mixer",
           "RMSNorm"]
