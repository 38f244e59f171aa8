"""Assembly of a Puzzle child: one library candidate per parent layer, each rebuilt from the parent by
its recipe (`library.materialize`) and given its BLD-trained weights where BLD trained it
(`bld.load_trained`), put into the parent with `replace_layers`; saved as an ordinary checkpoint
directory (`save_pretrained`) with `assembly.json` saying where each layer came from.
"""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from nemojax.compress.puzzle import bld, library
from nemojax.io.hf import save_pretrained
from nemojax.nn.model import HybridLM, param_counts

ASSEMBLY_NAME = "assembly.json"


def assemble_from_dirs(parent: HybridLM, keys, library_candidates, bld_dir=None, *, tokens=None,
                       out_dir=None) -> tuple[HybridLM, dict]:
    """(child, record) for the candidate keys `keys` (f"{layer}:{name}", one per parent layer, any order).

    library_candidates: the library's `Candidate`s (`library.load_library`). bld_dir: a BLD output
    directory; a chosen candidate it trained gets its trained weights (one it holds unfinished is an
    error), one it does not hold keeps the weights its recipe derives from the parent. tokens: int32
    [B, T] calibration tokens, needed only when a least-squares linear fit is chosen (its recipe fits it
    on the parent's inputs to its layer, even where BLD weights replace the fit). out_dir: when given,
    the child is saved there with `save_pretrained`, beside `assembly.json` (the record).
    record: {"keys": [key per layer], "source": [per layer "parent" / "noop" / "bld" / "recipe"],
    "params": {"parent": total, "child": total}}."""
    n = len(parent.layers)
    by_key = {c.key: c for c in library_candidates}
    chosen = {}
    for key in keys:
        if key not in by_key:
            raise ValueError(f"keys: {key!r} is not in the library")
        layer = by_key[key].layer
        if layer in chosen:
            raise ValueError(f"keys: layer {layer} is chosen twice ({chosen[layer].key!r} and {key!r})")
        chosen[layer] = by_key[key]
    missing = [i for i in range(n) if i not in chosen]
    if missing:
        raise ValueError(f"keys: no candidate for layers {missing}; give one per layer (e.g. '{missing[0]}:parent')")

    fits = sorted(i for i, c in chosen.items() if c.recipe["op"] == "linear_fit")
    if fits and tokens is None:
        raise ValueError(f"tokens: needed for the least-squares linear fits of layers {fits}")
    states = nnx.jit(lambda m, t: m.layer_states(t))(parent, tokens) if fits else None
    trained = json.loads((Path(bld_dir) / bld.RECORD).read_text()) if bld_dir is not None else {}

    changes, source = {}, []
    for i in range(n):
        c = chosen[i]
        op = c.recipe["op"]
        if op in ("parent", "noop"):
            source.append(op)
            if op == "noop":
                changes[i] = (c.spec, None)
            continue
        _, spec, module = library.materialize(parent, c, None if states is None else states[i])
        if c.key in trained:
            module = bld.load_trained(bld_dir, c.key, module)
        source.append("bld" if c.key in trained else "recipe")
        changes[i] = (spec, module)
    child = parent.replace_layers(changes)
    record = {"keys": [chosen[i].key for i in range(n)], "source": source,
              "params": {"parent": param_counts(parent.cfg)["total"], "child": param_counts(child.cfg)["total"]}}
    if out_dir is not None:
        save_pretrained(child, out_dir)
        (Path(out_dir) / ASSEMBLY_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return child, record
