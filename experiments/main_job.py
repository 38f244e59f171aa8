"""The README's main job, measured: `nemojax train` on its built-in defaults (tiny-hybrid on the
built-in text, 300 steps), with the numbers the README states written to a result file.

    python experiments/main_job.py            # -> experiments/results/main_job.json

The run directory (default runs/main_job) is started afresh, so the time is one uninterrupted run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
from pathlib import Path

import jax

import nemojax as nj
from nemojax.data.text import builtin_documents
from nemojax.train import TrainConfig, train

RESULT = Path(__file__).parent / "results" / "main_job.json"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/main_job", help="run directory (deleted first)")
    p.add_argument("--result", default=str(RESULT), help="result JSON")
    args = p.parse_args(argv)
    shutil.rmtree(args.out_dir, ignore_errors=True)
    tc = TrainConfig(out_dir=args.out_dir)  # the CLI's defaults: what `nemojax train` runs
    summary = train(tc)
    counts = nj.param_counts(nj.presets.get(tc.preset))
    ev0, ev1 = summary["initial_eval"], summary["final_eval"]
    out = {
        "command": "nemojax train",
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "preset": tc.preset, "data": tc.data, "steps": tc.steps, "parameters": counts["total"],
        "corpus_bytes": sum(len(d.encode()) for d in builtin_documents()),
        "train_seconds": summary["seconds_total"],
        "initial_eval": {**ev0, "perplexity": math.exp(ev0["ce"])},
        "final_eval": {**ev1, "perplexity": math.exp(ev1["ce"])},
        "eval_tokens": summary["eval_tokens"],
        "sample": summary["sample"],
    }
    Path(args.result).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "sample"}, indent=2))
    return out


if __name__ == "__main__":
    main()
