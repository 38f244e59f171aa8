"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from nemojax.nn.registry import rule_at
from nemojax.train.config import TrainConfig


def decays(path) -> bool:
    """Whether the parameter at this key path gets weight decay (its layer kind's rule: not norms,
    biases or SSM parameters)."""
    return rule_at(path).decay


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def schedule(tc: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps, decay_steps=tc.steps,
        end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if tc.grad_clip > 0 else adamw
