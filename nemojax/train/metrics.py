"""Metrics as JSON lines (one object per logged step) and a plot of the curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class MetricsLog:
    """Appends to `path`; on resume from `start_step` it drops records past that step, so a run that was
    interrupted after its last checkpoint does not leave duplicate or orphaned points. `start_step=None`
    (a run that starts afresh) drops every record, those of a run killed before its first checkpoint too."""

    def __init__(self, path, start_step: int | None):
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if start_step is not None and r["step"] <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def read_metrics(path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_metrics(records: list[dict], png_path, title: str = "") -> None:
    """Loss curves (train and eval), learning rate and, for MoE models, expert load imbalance."""
    # a Figure without pyplot: no backend switch under the caller (a notebook's inline plots keep working)
    from matplotlib.figure import Figure

    def series(key):
        pts = [(r["step"], r[key]) for r in records if key in r]
        return tuple(zip(*pts)) if pts else ((), ())

    moe = any("moe_max_load" in r for r in records)
    fig = Figure(figsize=(13 if moe else 9, 3.6))
    axes = fig.subplots(1, 3 if moe else 2)
    ax = axes[0]
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        s, v = series(key)
        if s:
            ax.plot(s, v, style, label=key, ms=4)
    ax.set(xlabel="step", ylabel="cross entropy (nats/token)", title=title or "loss")
    ax.legend()
    ax.grid(alpha=0.3)
    s, v = series("lr")
    axes[1].plot(s, v)
    axes[1].set(xlabel="step", ylabel="learning rate", title="schedule")
    axes[1].grid(alpha=0.3)
    if moe:
        s, v = series("moe_max_load")
        axes[2].plot(s, v, label="max expert load x E (1 = balanced)")
        s, v = series("moe_dropped_fraction")
        if s:
            axes[2].plot(s, v, label="dropped fraction")
        axes[2].set(xlabel="step", title="MoE routing")
        axes[2].legend()
        axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
