"""The training run's configuration: one frozen, typed dataclass that the CLI is generated from and
that is saved beside every checkpoint (so `nemojax eval/generate` rebuild the same model and data)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from nemojax.ops.moe import IMPLEMENTATIONS as MOE_IMPLEMENTATIONS
from nemojax.quant.linear import RECIPES, SWITCHES, Precision, default_high_precision_layers, recipe

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    # model and data
    preset: str = field(default="tiny-hybrid", metadata={"help": "model preset (see `nemojax info`)"})
    data: str = field(default="text", metadata={"help": "dataset: text (built-in corpus: Python's help text), stdlib "
                                                        "(Python's standard library source; validation = whole "
                                                        "held-out files), file, mqar, induction, selective_copy"})
    data_path: str | None = field(default=None, metadata={"help": "a .txt or .jsonl file, for --data file"})
    data_options: dict = field(default_factory=dict, metadata={
        "help": "extra dataset options as KEY=VALUE, e.g. num_kv_pairs=8 (repeatable)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    # optimisation
    steps: int = field(default=300, metadata={"help": "total optimizer steps (the schedule's length)"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int | None = field(default=None, metadata={"help": "linear warmup steps", "default": "steps // 10"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay floor, as a fraction of lr"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay (not on norms, biases, A_log, D, dt_bias)"})
    b1: float = field(default=0.9, metadata={"help": "Adam's first-moment decay"})
    b2: float = field(default=0.95, metadata={"help": "Adam's second-moment decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "global-norm gradient clipping (0: off)"})
    compute_dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16 (fp32 master weights)"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights, the data order and the "
                                                    "quantisation randomness"})
    # low-precision training (nemojax.quant.linear, nemojax.quant.training)
    precision: str = field(default="bf16", metadata={
        "help": "the linear layers' matmuls (forward and both gradients): bf16 (unquantised, in --compute-dtype), "
                "fp8 (E4M3 weights and activations, E5M2 gradients, per-tensor scaling) or nvfp4 (the NVFP4 "
                "pretraining recipe), the routed experts' GEMMs too; router, norms, SSM scan, embeddings and LM head "
                "stay unquantised"})
    precision_disable: str | None = field(default=None, metadata={
        "help": "parts of the --precision recipe to switch off for ablations, comma-separated: "
                + ", ".join(SWITCHES), "default": "none"})
    high_precision_layers: str | None = field(default=None, metadata={
        "help": "layers left unquantised, as first=N,last=M",
        "default": "fp8: first=1,last=1; nvfp4: 2/62 and 8/62 of the layers, rounded up"})
    # MoE and MTP
    moe_implementation: str | None = field(default=None, metadata={"help": "MoE dispatch: " + ", ".join(MOE_IMPLEMENTATIONS),
                                                                   "default": "the fastest for the backend"})
    capacity_factor: float | None = field(default=None, metadata={"help": "expert capacity factor",
                                                                  "default": "dropless"})
    correction_bias_rate: float = field(default=1e-3, metadata={"help": "aux-loss-free correction-bias update rate"})
    moe_aux_loss_coef: float = field(default=1e-4, metadata={"help": "per-sequence load-balancing loss weight"})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "router z-loss weight"})
    mtp_lambda: float = field(default=0.3, metadata={"help": "MTP loss weight (divided by the MTP depth)"})
    # bookkeeping
    out_dir: str = field(default="runs/default", metadata={"help": "checkpoints, metrics.jsonl, loss.png"})
    resume: bool = field(default=True, metadata={"help": "continue from the newest intact checkpoint in out_dir"})
    resume_step: int | None = field(default=None, metadata={
        "help": "resume from this checkpoint step instead (later checkpoints are moved to "
                "out_dir/superseded_checkpoints/, not deleted)"})
    allow_changes: bool = field(default=False, metadata={
        "help": "on resume, accept changed optimisation settings (steps, lr, ...); summary.json records them"})
    skip_memory_check: bool = field(default=False, metadata={
        "help": "train even when the memory estimate exceeds the machine's memory"})
    save_every: int = field(default=100, metadata={"help": "checkpoint interval in steps"})
    eval_every: int = field(default=100, metadata={"help": "evaluation interval in steps"})
    eval_batches: int = field(default=4, metadata={"help": "batches per evaluation"})
    log_every: int = field(default=10, metadata={"help": "metrics interval in steps"})
    sample_prompt: str = field(default="The ", metadata={"help": "prompt of the sample printed at the end"})
    sample_tokens: int = field(default=160, metadata={"help": "tokens in that sample (0: no sample)"})
    mesh: str | None = field(default=None, metadata={"help": "device mesh, e.g. data=2,fsdp=2,expert=2",
                                                     "default": "all devices on data"})

    def __post_init__(self):
        if self.resume_step is not None and self.resume_step < 0:
            raise ValueError(f"resume_step must be >= 0 or None (the newest intact checkpoint); got {self.resume_step}")
        if self.moe_implementation is not None and self.moe_implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(f"moe_implementation must be None or one of {MOE_IMPLEMENTATIONS}; "
                             f"got {self.moe_implementation!r}")
        for name in ("seq_len", "batch_size", "steps", "save_every", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.warmup_steps is None:  # resolved here, so the saved config records the number used
            object.__setattr__(self, "warmup_steps", self.steps // 10)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}; got {self.compute_dtype!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}); got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless); got {self.capacity_factor}")
        if self.precision not in RECIPES:
            raise ValueError(f"precision must be one of {tuple(RECIPES)}; got {self.precision!r}")
        self.precision_recipe()  # checks precision_disable
        if self.high_precision_layers is not None:
            if RECIPES[self.precision] is None:
                raise ValueError(f"high_precision_layers: only with a quantised precision {tuple(RECIPES)[1:]}; got "
                                 f"{self.high_precision_layers!r} with precision {self.precision!r}")
            self.high_precision_counts(0)  # checks its syntax

    def precision_recipe(self) -> Precision | None:
        """The Precision of the linear layers' matmuls (None: unquantised)."""
        disable = () if self.precision_disable is None else tuple(self.precision_disable.split(","))
        return recipe(self.precision, disable)

    def high_precision_counts(self, num_layers: int) -> tuple[int, int]:
        """(first, last) layers kept unquantised: `high_precision_layers`, or the recipe's default for a
        model of `num_layers` layers."""
        if self.high_precision_layers is None:
            return default_high_precision_layers(self.precision, num_layers)
        items = self.high_precision_layers.split(",")
        parts = dict(p.partition("=")[::2] for p in items)
        if len(items) != 2 or sorted(parts) != ["first", "last"] or not all(v.isdigit() for v in parts.values()):
            raise ValueError(f"high_precision_layers must be first=N,last=M with integers N, M >= 0; got "
                             f"{self.high_precision_layers!r}")
        return int(parts["first"]), int(parts["last"])

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        raw = json.loads(Path(path).read_text())
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**raw)

    def changes_from(self, saved: "TrainConfig") -> tuple[list[str], dict]:
        """What resuming `saved`'s run with this config would change: (fields that must stay fixed,
        {field: [saved, new]} of the settings that `allow_changes` accepts). Fields in
        `FREE_ON_RESUME` may always change."""
        fixed = [k for k in FIXED_ON_RESUME if getattr(saved, k) != getattr(self, k)]
        others = [f.name for f in dataclasses.fields(self) if f.name not in FIXED_ON_RESUME + FREE_ON_RESUME]
        return fixed, {k: [getattr(saved, k), getattr(self, k)] for k in others if getattr(saved, k) != getattr(self, k)}


# The model, the data and their order: a run with other values is another run.
FIXED_ON_RESUME = ("preset", "data", "data_path", "data_options", "seq_len", "batch_size", "seed")
# Bookkeeping and how (not what) to compute. Every other field changes the training trajectory, so
# resuming with another value needs `allow_changes`.
FREE_ON_RESUME = ("out_dir", "resume", "resume_step", "allow_changes", "skip_memory_check", "save_every",
                  "eval_every", "eval_batches", "log_every", "sample_prompt", "sample_tokens", "mesh",
                  "moe_implementation")
