"""Named model configurations: `nj.presets.get("nemotron-3-nano-30b-a3b")`, `nj.presets.names()`.

The published models (shapes from their HF configs) and tiny ones that keep every structural
feature of the big ones at test and demo scale.
"""

from __future__ import annotations

from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec, from_pattern

VOCAB = 131072  # the Nemotron tokenizer
MAMBA_HEAD_DIM = 64
ATTENTION_HEAD_DIM = 128
MAMBA_GROUPS = 8


def _nemotron_h(name, pattern, hidden, mamba_heads, state, ffn, heads, kv_heads=8):
    return from_pattern(
        pattern, vocab_size=VOCAB, hidden_size=hidden, name=name,
        mamba=MambaSpec(num_heads=mamba_heads, head_dim=MAMBA_HEAD_DIM, n_groups=MAMBA_GROUPS, state_size=state),
        attention=AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=ATTENTION_HEAD_DIM),
        mlp=MLPSpec(intermediate_size=ffn),
    )


def _build() -> dict[str, ModelConfig]:
    p: dict[str, ModelConfig] = {}
    p["nemotron-h-8b"] = _nemotron_h(
        "nemotron-h-8b", "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-", 4096, 128, 128, 21504, 32)
    p["nemotron-h-56b"] = _nemotron_h(
        "nemotron-h-56b",
        "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-"
        "M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-", 8192, 256, 256, 32768, 64)
    attn_2kv = AttentionSpec(num_heads=32, num_kv_heads=2, head_dim=ATTENTION_HEAD_DIM)
    p["nemotron-3-nano-30b-a3b"] = from_pattern(
        "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", vocab_size=VOCAB, hidden_size=2688,
        name="nemotron-3-nano-30b-a3b",
        mamba=MambaSpec(num_heads=64, head_dim=MAMBA_HEAD_DIM, n_groups=MAMBA_GROUPS, state_size=128),
        attention=attn_2kv,
        moe=MoESpec(num_experts=128, top_k=6, intermediate_size=1856, shared_intermediate_size=3712,
                    routed_scaling_factor=2.5),
    )
    p["nemotron-3-super-120b-a12b"] = from_pattern(
        "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME",
        vocab_size=VOCAB, hidden_size=4096, name="nemotron-3-super-120b-a12b",
        mamba=MambaSpec(num_heads=128, head_dim=MAMBA_HEAD_DIM, n_groups=MAMBA_GROUPS, state_size=128),
        attention=attn_2kv,
        moe=MoESpec(num_experts=512, top_k=22, intermediate_size=2688, shared_intermediate_size=5376,
                    latent_size=1024, routed_scaling_factor=5.0),
        mtp_pattern="*E", mtp_depth=1,
    )
    tiny_mamba = MambaSpec(num_heads=4, head_dim=16, n_groups=2, state_size=16, chunk_size=16)
    tiny_attn = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16)
    p["tiny-hybrid"] = from_pattern("M-M*-", vocab_size=256, hidden_size=64, name="tiny-hybrid",
                                    mamba=tiny_mamba, attention=tiny_attn, mlp=MLPSpec(128))
    p["tiny-moe"] = from_pattern(
        "MEM*E", vocab_size=256, hidden_size=64, name="tiny-moe", mamba=tiny_mamba, attention=tiny_attn,
        moe=MoESpec(num_experts=8, top_k=2, intermediate_size=32, shared_intermediate_size=64,
                    n_group=2, topk_group=1, routed_scaling_factor=2.5))
    p["tiny-latent-mtp"] = from_pattern(
        "ME*E", vocab_size=256, hidden_size=64, name="tiny-latent-mtp", mamba=tiny_mamba, attention=tiny_attn,
        moe=MoESpec(num_experts=16, top_k=4, intermediate_size=32, shared_intermediate_size=64,
                    latent_size=32, routed_scaling_factor=5.0),
        mtp_pattern="*E", mtp_depth=1)
    # The Puzzle study's parent (experiments/puzzle): Nano's layer kinds and routing (sigmoid top-k with a
    # shared expert and a scaling factor) at a size that trains on a CPU; every kind has room to shrink
    # (8 Mamba heads, 4 KV heads, 16 experts at top-4).
    p["puzzle-parent"] = from_pattern(
        "ME*EM-ME*E", vocab_size=256, hidden_size=160, name="puzzle-parent",
        mamba=MambaSpec(num_heads=8, head_dim=32, n_groups=2, state_size=32, chunk_size=64),
        attention=AttentionSpec(num_heads=8, num_kv_heads=4, head_dim=32), mlp=MLPSpec(512),
        moe=MoESpec(num_experts=16, top_k=4, intermediate_size=128, shared_intermediate_size=256,
                    routed_scaling_factor=2.5))
    return p


PRESETS: dict[str, ModelConfig] = _build()


def get(name: str) -> ModelConfig:
    """A preset by name (see `names()`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def names() -> list[str]:
    return sorted(PRESETS)


__all__ = ["PRESETS", "get", "names"]
