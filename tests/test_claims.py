"""The numbers in the project's documents against the files they come from.

Every markdown table with a number in it has an HTML comment on the last non-blank line above it
that names its source, e.g. `<!-- source: experiments/results/mqar_ablation.json -->` (a `#name` suffix tells
several tables from one file apart). Below, one function per source renders the table's cells from
the file with the rounding the text uses; the test compares them cell by cell, header included, so a
re-run that changes a number fails here until the text follows. Numbers stated in sentences are held
the same way: a `@prose` function renders, from the file, the phrases that the document must contain.

Adding a table: put the marker above it and register one `@table("path[#name]")` function that
returns its rows (header first, no separator row).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from statistics import mean, median

import pytest
from testutils import closed_form_counts  # equals nj.param_counts (test_config.py asserts it), no tracing

import nemojax as nj

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "experiments/ntk/README.md", "experiments/benchmarks/RESULTS.md",
             "experiments/puzzle/README.md", "experiments/fusion/README.md", "experiments/precision/README.md")
MARKER = re.compile(r"<!--\s*source:\s*(\S+)\s*-->")

# Sections whose tables still wait for their source marker and renderer: (document, heading prefix).
# The section's owner deletes the entry when adding them. Only *unmarked* tables are excused (a
# marked table there is checked like any other), and an entry with no unmarked table left fails.
PENDING_SOURCES: set[tuple[str, str]] = set()

TABLES: dict[str, Callable] = {}
PROSE: dict[tuple[str, str], Callable] = {}


def table(source: str):
    def register(fn):
        TABLES[source] = fn
        return fn
    return register


def prose(document: str, source: str):
    def register(fn):
        PROSE[(document, source)] = fn
        return fn
    return register


def load(source: str):
    path = ROOT / source.split("#")[0]
    return json.loads(path.read_text()) if path.suffix == ".json" else None


@dataclasses.dataclass
class Table:
    document: str
    line: int  # 1-based line of the table's first row
    section: str  # the heading above it
    source: str | None
    rows: list[list[str]]


def split_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_tables(document: str) -> list[Table]:
    lines = (ROOT / document).read_text().splitlines()
    tables, section, fenced, i = [], "", False, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            section = line.lstrip("#").strip()
        elif not fenced and line.startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            rows = [split_row(x) for x in lines[start:i]
                    if not all(re.fullmatch(r":?-+:?", c) for c in split_row(x))]
            above = next((x for x in reversed(lines[:start]) if x.strip()), "")
            marker = MARKER.fullmatch(above.strip())
            tables.append(Table(document, start + 1, section, marker and marker.group(1), rows))
            continue
        i += 1
    return tables


ALL_TABLES = [t for doc in DOCUMENTS for t in parse_tables(doc)]


def has_number(t: Table) -> bool:
    return any(re.search(r"\d", c) for row in t.rows for c in row)


def in_section(t: Table, entry: tuple[str, str]) -> bool:
    return t.document == entry[0] and t.section.startswith(entry[1])


def table_diffs(t: Table) -> list[str]:
    """Where the table differs from what its source renders, cell by cell."""
    expected = TABLES[t.source](load(t.source))
    diffs = [f"row {r}: {'|'.join(got)!r} != {'|'.join(want)!r}"
             for r, (got, want) in enumerate(zip(t.rows, expected)) if got != want]
    if len(t.rows) != len(expected):
        diffs.append(f"{len(t.rows)} rows in the text, {len(expected)} rendered from the file")
    return diffs


# ------------------------------------------------------------------------------------ formatting
def f2(x: float) -> str:
    return f"{x:.2f}"


def span(values, fmt=f2, sep="-") -> str:
    """'lo-hi' of a set of numbers, or the single number when they round alike."""
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}{sep}{hi}"


# ------------------------------------------------------------------------------------- README.md
MQAR = "experiments/results/mqar_ablation.json"


def mqar_cells(d):
    return {(c["arch"], c["seq_len"], c["num_kv_pairs"]): c for c in d["cells"]}


@table(MQAR)
def mqar_table(d):
    cells, archs = mqar_cells(d), {r["arch"]: r["pattern"] for r in d["rows"]}
    grid = sorted({(L, kv) for _, L, kv in cells})
    rows = [["model"] + [f"L={L}, {kv} pairs" for L, kv in grid]]
    for arch, pattern in archs.items():
        rows.append([f"{arch} `{pattern}`"] + [
            f"{c['accuracy_mean']:.2f} ({c['accuracy_min']:.2f}-{c['accuracy_max']:.2f})"
            for c in (cells[(arch, L, kv)] for L, kv in grid)])
    return rows


@prose("README.md", MQAR)
def mqar_prose(d):
    cfg, cells = d["config"], mqar_cells(d)
    params = [r["params_total"] for r in d["rows"]]
    single = ("mamba", "attention")
    hard = [r for r in d["rows"] if r["num_kv_pairs"] == max(cfg["kv"])]
    longest = max(cfg["lengths"])
    # the claims the sentences make, checked before their numbers are rendered
    for L, kv in {(L, kv) for _, L, kv in cells}:
        assert min(cells[(a, L, kv)]["accuracy_mean"] for a in ("hybrid", "hybrid-moe")) >= \
            max(cells[(a, L, kv)]["accuracy_mean"] for a in single), ("hybrids best everywhere", L, kv)
    solved = [r["accuracy"] for r in hard if r["arch"].startswith("hybrid") and r["seq_len"] == longest]
    mamba_short = min(r["accuracy"] for r in d["rows"] if r["arch"] == "mamba" and r["num_kv_pairs"] == min(cfg["kv"]))
    return [
        f"models of {round(min(params) / 1000)}-{round(max(params) / 1000)}K parameters",
        f"Recall accuracy after {cfg['steps']} steps (vocabulary {cfg['vocab']}), mean over seeds "
        f"{' and '.join(map(str, cfg['seeds']))} with their range",
        f"Pure Mamba degrades with length ({mamba_short:.2f} on one seed at L = {longest} with {min(cfg['kv'])} pairs)",
        f"at {max(cfg['kv'])} pairs no single-mixer run exceeds "
        f"{max(r['accuracy'] for r in hard if r['arch'] in single):.2f}",
        f"at L = {longest} one seed of each hybrid solves it ({', '.join(f2(a) for a in sorted(solved)[2:])}) "
        f"while the other stays at {span(sorted(solved)[:2])}",
    ]


@table("nemojax/presets.py")
def preset_table(_):
    rows = [["preset", "layers (M / * / - / E)", "total", "active per token"]]
    for name in ("nemotron-h-8b", "nemotron-h-56b", "nemotron-3-nano-30b-a3b", "nemotron-3-super-120b-a12b"):
        cfg = nj.presets.get(name)
        total, active = closed_form_counts(cfg)
        layers = " / ".join(str(cfg.pattern.count(s)) for s in "M*-E")
        mtp = f" (+ MTP `{cfg.mtp_pattern}`)" if cfg.mtp_depth else ""
        rows.append([name, layers + mtp, f"{total / 1e9:.2f}B", f"{active / 1e9:.2f}B"])
    return rows


@prose("README.md", "experiments/results/main_job.json")
def main_job_prose(d):
    ev0, ev1 = d["initial_eval"], d["final_eval"]
    return [f"Measured by `experiments/main_job.py` ({d['cpus']} CPUs, {d['date']}, jax {d['jax']}): "
            f"{d['train_seconds']:.0f} s of training",
            f"held-out loss from {ev0['ce']:.2f} nats/byte untrained (perplexity {ev0['perplexity']:.0f}, about uniform "
            f"over 256 bytes) to {ev1['ce']:.2f} (perplexity {ev1['perplexity']:.1f}), next-byte accuracy from "
            f"{ev0['accuracy']:.3f} to {ev1['accuracy']:.3f}, on {d['eval_tokens']} held-out bytes",
            f"{d['parameters'] / 1e6:.2f}M parameters, {d['steps']} steps",
            f"Python's pydoc topics, {round(d['corpus_bytes'] / 1000)} KB"]


@prose("README.md", "nemojax/presets.py")
def preset_prose(_):
    cfg = nj.presets.get("nemotron-3-nano-30b-a3b")
    embedding = cfg.vocab_size * cfg.hidden_size
    return [f"(Nano: {(closed_form_counts(cfg)[1] - embedding) / 1e9:.2f}B without the {embedding / 1e9:.2f}B input "
            f"embedding)"]


# ------------------------------------------------------------------------- experiments/ntk/README.md
NTK = "experiments/ntk/README.md"
SPECTRA = "experiments/ntk/results/laplace_vs_ntk_spectra.json"
DEPTH = "experiments/ntk/results/resnet_depth_scaling.json"
FREQ = "experiments/ntk/results/frequency_bias_msk.json"
DENSITY = "experiments/ntk/results/density_bias.json"
BLOCKS = "experiments/ntk/results/block_replacement.json"


@table(SPECTRA)
def spectra_table(d):
    ntk, laplace = f"NTK (depth {d['depth']})", "Laplace (c=1)"
    return [["d", ntk, "Laplace", "k^-d"]] + [
        [dim, f2(v[ntk]["slope"]), f2(v[laplace]["slope"]), f"-{dim}"] for dim, v in d["dims"].items()]


@prose(NTK, SPECTRA)
def spectra_prose(d):
    worst = max(d["dims"], key=int)
    short = 1 + d["dims"][worst][f"NTK (depth {d['depth']})"]["slope"] / int(worst)
    return [f"(Gauss-Jacobi quadrature, {d['n_quad']} nodes) of the depth-{d['depth']} ReLU NTK",
            f"Log-log slopes fitted over k in [{d['fit_range'][0]}, {d['fit_range'][1]}]",
            f"at k <= {d['kmax']} the d = {worst} slope is still {100 * short:.0f}% short"]


@table(DEPTH)
def depth_table(d):
    def k1(x):
        return f"{x:.0f}" if x >= 1000 else f2(x)

    depths = [1, 4, 16, 64]
    runs = {(r["gamma"], r["depth"]): r for r in d["runs"]}
    gammas = sorted({g for g, _ in runs})
    rows = [["gamma", f"K(1) at L = {depths[0]}"] + [str(L) for L in depths[1:]]
            + [f"K(0)/K(1) at L = {depths[-1]}", f"mu_3/mu_2 at L = {depths[-1]}"]]
    for g in gammas:
        last = runs[(g, depths[-1])]
        rows.append([f"{g:g}"] + [k1(runs[(g, L)]["K1"]) for L in depths]
                    + [f"{last['K0_over_K1']:.3f}", f"{last['mu3_over_mu2']:.3f}"])
    return rows


@table(FREQ)
def frequency_table(d):
    rows = d["rows"]
    return [["k"] + [str(r["k"]) for r in rows],
            ["GD, measured"] + [str(r["gd_measured"]) for r in rows],
            ["GD, NTK prediction (I - lr K/n)^t"] + [str(r["gd_predicted"]) for r in rows],
            [f"PGD, top {d['args']['flatten']} eigenpairs flattened"] + [str(r["pgd_measured"]) for r in rows]]


@prose(NTK, FREQ)
def frequency_prose(d):
    a, rows, drift = d["args"], d["rows"], d["kernel_drift"]
    close = [r for r in rows if r["k"] <= 4]
    far = [r for r in rows if r["k"] >= 6]
    worst_close = max(abs(r["gd_measured"] / r["gd_predicted"] - 1) for r in close)
    slopes = d["loglog_slope_k>=2"]
    return [
        f"Two-layer ReLU net, width {a['width']}, biases of scale {a['beta']:g}, n = {a['n']} equispaced points",
        f"iterations until the loss falls below {100 * a['tol']:g}% of its start",
        f"For k <= {close[-1]['k']} the kernel-regime prediction matches the trained network within "
        f"{math.ceil(100 * worst_close)}%",
        f"least-squares fit over k = 2..{rows[-1]['k']}: the predicted count grows like "
        f"k^{slopes['gd_predicted']:.2f} and the measured one like k^{slopes['gd_measured']:.2f}",
        f"at k = {far[0]['k']}-{far[-1]['k']} the measured count is "
        f"{span([r['gd_measured'] / r['gd_predicted'] for r in far], lambda x: f'{x:.1f}')}x the prediction",
        f"the target's Rayleigh quotient is "
        f"{span([1 / r['rayleigh_over_lambda_max'] for r in far], lambda x: f'{x:.0f}')}x below lambda_max",
        f"at initialisation the empirical NTK's Rayleigh quotient of sin {drift['k']} theta is "
        f"{drift['empirical_over_analytic_at_init']:.2f}x the analytic one; after {drift['steps']} GD steps it is "
        f"{drift['trained_over_init']:.2f}x its initial value",
        f"flattening the top {a['flatten']} eigenvalues of K/n makes the count almost flat in k: "
        f"{d['speedup_at_max_k']:.0f}x fewer iterations than GD at k = {rows[-1]['k']}",
    ]


@table(DENSITY)
def density_table(d):
    def sd(pair):
        return f"{pair[0]:.0f} / {pair[1]:.0f}"

    rows = [["k", "NTK slope", "network slope", "NTK iterations, sparse / dense arc", "network, sparse / dense"]]
    for r in d["rows"]:
        net = "network_slope" in r
        rows.append([str(r["k"]), f2(r["kernel_slope"]), f2(r["network_slope"]) if net else "",
                     sd(r["kernel_sparse_dense"]), sd(r["network_sparse_dense"]) if net else ""])
    return rows


@prose(NTK, DENSITY)
def density_prose(d):
    a, rows, p = d["args"], {r["k"]: r for r in d["rows"]}, d["arc_density"]
    net = [k for k in a["net_ks"] if k in rows]

    def over(k):  # measured / predicted iterations on the sparse and the dense arcs
        return [n / m for n, m in zip(rows[k]["network_sparse_dense"], rows[k]["kernel_sparse_dense"])]

    followed = [k for k in net if abs(rows[k]["network_slope"] + 1) < 0.1]
    broken = [k for k in net if k not in followed]
    out = [f"n = {a['n']} points drawn (jittered quantiles) from p(theta) = (1 + {a['a']:g} cos theta)/(2 pi), so "
           f"the density varies {max(p) / min(p):.0f}x between the sparsest and densest of {a['bins']} arcs",
           f"Same two-layer network and lr as experiment 3 (width {a['width']}, bias scale {a['beta']:g}",
           f"below {100 * a['tol']:g}% of its start",
           f"At k = {rows[2]['k']} the residual is a global mode and converges nearly uniformly "
           f"(slope {rows[2]['kernel_slope']:.1f})",
           f"The trained network follows the law at k = {' and '.join(map(str, followed))} (slopes "
           f"{', '.join(f2(rows[k]['network_slope']) for k in followed)}; counts within "
           f"{span([x for k in followed for x in over(k)], lambda x: f'{x:.1f}')}x of the prediction)"]
    for k in broken:
        out.append(f"At k = {k} the network is {over(k)[0]:.1f}x (sparse) to {over(k)[1]:.1f}x (dense arcs) slower "
                   f"than predicted and the slope flattens to {f2(rows[k]['network_slope'])}")
    out.append(f"took {d['seconds'] / 60:.0f} min")
    return out


def blocks_setting(d, name):
    return next(s for s in d["settings"] if s["name"] == name)


def rhos(s, pair, fmt=f2):
    return ", ".join(fmt(s["spearman"][pair][op]["rho"]) for op in ("remove", "linear", "fuse", "all"))


def ratios(s, pair):
    return ", ".join(f2(s["median_ratio"][pair][op]) for op in ("remove", "linear", "fuse"))


@table(BLOCKS)
def blocks_table(d):
    rows = [["setting", "seeds", "base test MSE predicted / measured (mean, range)",
             "surgery rho: remove, linear, fuse, all", "measured/predicted (surgery)",
             "retrain rho: remove, linear, fuse, all", "measured/predicted (retrain)"]]
    for s in d["settings"]:
        base = s["base_test_mse"]
        m = base["measured"]
        rows.append([s["name"], str(s["seeds"]),
                     f"{base['predicted']:.2g} / {mean(m):.2g} ({min(m):.2g}-{max(m):.2g})",
                     rhos(s, "lazy_surgery vs surgery"), ratios(s, "surgery / lazy_surgery"),
                     rhos(s, "lazy_retrain vs retrain"), ratios(s, "retrain / lazy_retrain")])
    return rows


@prose(NTK, BLOCKS)
def blocks_prose(d):
    a, ops = d["args"], ("remove", "linear", "fuse")
    ref, one, narrow, big, adam, raw = (blocks_setting(d, n) for n in (
        "alpha=L^-1/2, m=256", "alpha=1, m=256", "alpha=L^-1/2, m=64", "alpha=2, m=64, 600 steps",
        "alpha=L^-1/2, m=256, Adam", "alpha=L^-1/2, m=256, raw f"))

    def rho(s, pair, op):
        return s["spearman"][pair][op]["rho"]

    def ratio(s, pair, op):
        return s["median_ratio"][pair][op]

    def column(s, key, op=None):
        return [r[key] for r in s["rows"] if op in (None, r["op"])]

    def base(s):
        return mean(s["base_test_mse"]["measured"]), s["base_test_mse"]["predicted"]

    def f3(x):
        return f"{x:.3f}"

    def f4(x):
        return f"{x:.4f}"

    # the sentences' qualitative claims, checked before their numbers are rendered
    damage = [mean(column(ref, "surgery", op)) for op in ops]
    assert damage == sorted(damage, reverse=True), damage  # "fusion is the safest op, then linearisation"
    noise, signal = median(column(big, "retrain_seed_std")), median(map(abs, column(big, "lazy_retrain")))
    assert noise > signal, (noise, signal)  # "retraining ranks are lost" to seed noise
    significant = min(abs(x["rho"]) for s in d["settings"] for x in s["spearman"]["lazy_surgery vs surgery"].values()
                      if x["p"] < 0.05 and x["n"] == 6)
    kernel_remove = ref["spearman"]["kernel vs surgery"]["remove"]
    centred = [s for s in d["settings"] if s["centred"] and s is not ref]
    return [
        f"L = {a['depth']} blocks with an uneven profile alpha_l = alpha ({', '.join(map(f2, d['profile']))})",
        f"n = {a['n']} training and {a['n_test']} test points, target = sum of spherical harmonics of degrees "
        f"{a['degrees'][0]}-{a['degrees'][-1]}",
        f"{a['steps']} steps; the network trained is",
        f"For each of the {len(ref['rows'])} candidates",
        f"`kernel` vs retrain {rhos(ref, 'kernel vs retrain')} and `spectral` vs retrain "
        f"{rhos(ref, 'spectral vs retrain')}; against surgery {rhos(ref, 'kernel vs surgery')} (kernel) and "
        f"{rhos(ref, 'spectral vs surgery')} (spectral)",
        f"With 6 points per op, rho >= {significant:.2f} has p < 0.05; rho = {kernel_remove['rho']:.2f} does not "
        f"(p = {kernel_remove['p']:.2f})",
        f"both for retraining (rho = {span([rho(ref, 'lazy_retrain vs retrain', op) for op in ops])} per op) and, "
        f"through the cross-kernels, for surgery on the trained weights "
        f"({span([rho(ref, 'lazy_surgery vs surgery', op) for op in ops])})",
        f"surgery damage {span([ratio(ref, 'surgery / lazy_surgery', op) for op in ops])}x the prediction, "
        f"retrained networks {span([ratio(ref, 'retrain / lazy_retrain', op) for op in ops])}x the predicted change "
        f"(their base test MSE is {base(ref)[0] / base(ref)[1]:.2f}x the kernel's too)",
        f"ranks retraining as well as the data-based lazy prediction here ({rhos(ref, 'spectral vs retrain')})",
        f"rho = {span([rho(s, 'lazy_surgery vs surgery', 'remove') for s in centred])} for remove and "
        f"{span([rho(s, 'lazy_surgery vs surgery', 'fuse') for s in centred])} for fuse in every centred setting",
        f"even under Adam the measured damage is {span([ratio(adam, 'surgery / lazy_surgery', op) for op in ops])}x "
        f"the prediction",
        f"(test MSE {base(adam)[0]:.2g} vs the kernel's {base(adam)[1]:.2g})",
        f"every modified architecture reaches the same loss (all {len(adam['rows'])} changes within "
        f"+-{max(map(abs, column(adam, 'retrain'))):.4f}, seed s.d. up to "
        f"{max(column(adam, 'retrain_seed_std')):.4f})",
        f"while the kernel predicts changes of {span(column(adam, 'lazy_retrain'), f4)}",
        f"The correlations ({f2(rho(adam, 'lazy_retrain vs retrain', 'all'))} overall) rank noise",
        f"base loss {span([m / base(big)[1] for m in big['base_test_mse']['measured']], lambda x: f'{x:.1f}')}x the "
        f"prediction and retraining ranks are lost (remove {f2(rho(big, 'lazy_retrain vs retrain', 'remove'))}, "
        f"linear {f2(rho(big, 'lazy_retrain vs retrain', 'linear'))}, fuse "
        f"{f2(rho(big, 'lazy_retrain vs retrain', 'fuse'))})",
        f"the median seed s.d. of a measured change ({noise:.3f}) is larger than the median predicted change "
        f"({signal:.3f})",
        f"(predicted {span(column(big, 'lazy_retrain', 'linear'), f3, ' to ')}, measured "
        f"{span(column(big, 'retrain', 'linear'), lambda x: f'{x:+.3f}', ' to ')})",
        f"anti-correlated with linear surgery damage here (rho = {f2(rho(big, 'kernel vs surgery', 'linear'))}), "
        f"while the lazy cross-kernel prediction keeps rho = {f2(rho(big, 'lazy_surgery vs surgery', 'linear'))} "
        f"({f2(rho(big, 'lazy_surgery vs surgery_hermite', 'linear'))} for the theory's Hermite stand-in, whose "
        f"damage is {f2(ratio(big, 'surgery_hermite / lazy_surgery', 'linear'))}x the prediction; the least-squares "
        f"stand-in fits the non-Gaussian pre-activations better and does "
        f"{f2(ratio(big, 'surgery / lazy_surgery', 'linear'))}x the predicted damage)",
        f"retrain ranks for linear ({f2(rho(narrow, 'lazy_retrain vs retrain', 'linear'))}) and fuse "
        f"({f2(rho(narrow, 'lazy_retrain vs retrain', 'fuse'))}) are noise-limited",
        f"remove (larger effects) keeps rho = {f2(rho(narrow, 'lazy_retrain vs retrain', 'remove'))}",
        f"whose expected damage the theory gets right (ratio {f2(ratio(raw, 'surgery / lazy_surgery', 'remove'))}) "
        f"but whose realisation is one draw per seed, so the ranking of removals is noisy "
        f"(rho = {f2(rho(raw, 'lazy_surgery vs surgery', 'remove'))} with {raw['seeds']} seeds)",
        f"At alpha = 1 the absolute base loss is off by {base(one)[0] / base(one)[1]:.1f}x "
        f"({f3(base(one)[1])} vs {f3(base(one)[0])}) although ranks survive (the linear retrain ranks drop to "
        f"{f2(rho(one, 'lazy_retrain vs retrain', 'linear'))})",
        f"Runtime: {d['seconds'] / 60:.1f} min wall",
        f"`--seeds` sets the seed count ({a['seeds']} at m = {a['width']}, {narrow['seeds']} at "
        f"m = {a['small_width']})",
    ]


# ------------------------------------------------------------------ experiments/benchmarks/RESULTS.md
BENCH = "experiments/benchmarks/RESULTS.md"
DISPATCH = "experiments/benchmarks/results/moe_dispatch.json"
CPU_VS_HF = {h: f"experiments/benchmarks/results/cpu_vs_hf_h{h}.json" for h in (256, 512)}
CPU_VS_HF_GOALS = {512: {"train": 1.0, "decode": 4.0}, 256: {"train": 1.2, "decode": 5.0}}  # as cpu_vs_hf.py


def load_range(env_or_result) -> str:
    loads = [x for key in ("load_avg_at_start", "load_avg_at_end") for x in env_or_result[key]]
    return span(loads, lambda x: f"{x:.1f}")


@table(DISPATCH)
def dispatch_table(d):
    impls = list(d["cases"][0]["results"])
    rows = [["shape (T, D, F, E, K)", "router (busiest / mean load)", "capacity", "mode"]
            + [f"{i} (spread)" if i == d["default"] else i for i in impls]]
    for c in d["cases"]:
        r = c["results"]
        cap = "dropless" if c["capacity_factor"] is None else f"cf {c['capacity_factor']:g} (C={c['capacity']})"
        cells = [f"{r[i]['ms']:.1f} ms ({r[i]['ms_min']:.1f}-{r[i]['ms_max']:.1f})" if i == d["default"] else
                 f"{r[i]['ms']:.1f} ms, {r[i]['vs_default']:.2f}x ({r[i]['vs_default_cpu']:.2f}x)" for i in impls]
        rows.append([f"{c['shape']} ({c['T']}, {c['D']}, {c['F']}, {c['E']}, {c['K']})",
                     f"{c['router']} ({c['busiest_over_mean']:.2f})", cap, c["mode"]] + cells)
    return rows


@prose(BENCH, DISPATCH)
def dispatch_prose(d):
    def ratios(impl, pick):
        cases = [c for c in d["cases"] if pick(c)]
        return [c["results"][impl]["vs_default_cpu"] for c in cases]

    training = ("nano/16", "hf-bench-512", "hf-bench-256")
    unbalanced = lambda c: c["router"] == "unbalanced" and c["shape"] in training and c["mode"] == "fwd+bwd"
    balanced = lambda c: (c["router"] == "balanced" and c["capacity_factor"] is None and c["shape"] in training
                          and c["mode"] == "fwd+bwd")
    others = [i for i in d["cases"][0]["results"] if i != d["default"]]
    beaten = min(min(c["results"][i]["vs_default_cpu"] for i in others) for c in d["cases"]
                 if c["shape"] not in ("small",))
    return [f"jax {d['jax']}, {d['backend']} backend, {d['cpu_count']} cores, load average {load_range(d)}",
            f"median of {d['repeats']} rounds",
            f"dropless fwd+bwd with the unbalanced router, \"batched\" takes {span(ratios('batched', unbalanced))}x "
            f"and \"dense\" {span(ratios('dense', unbalanced))}x the CPU time of \"loop\"",
            f"with balanced routers \"batched\" takes {span(ratios('batched', balanced))}x",
            f"on every shape but \"small\" no other implementation takes less than {beaten:.2f}x the CPU time of "
            f"\"loop\""]


def cpu_vs_hf_rows(d, hidden: int):
    rows = [["model (busiest / mean expert load)", "metric", "HF tok/s", "nemojax tok/s", "wall ratio (goal)",
             "pair-ratio range", "CPU-time ratio", "roofline fraction nemojax / HF, wall (CPU time)"]]
    for name, r in d["results"].items():
        load = r.get("busiest_over_mean_load") or {}
        label = f"{name} ({min(load.values()):.2f}-{max(load.values()):.2f})" if load else name
        for metric in ("train", "decode"):
            m = r[metric]
            if metric == "train":
                f = m["roofline"]
                frac = (f"{f['jax']['fraction']:.2f} / {f['torch']['fraction']:.2f} "
                        f"({f['jax']['fraction_cpu']:.2f} / {f['torch']['fraction_cpu']:.2f})")
            else:
                frac = f"{m['bandwidth_fraction_nemojax']:.2f} / {m['bandwidth_fraction_hf']:.2f}"
            rows.append([label, metric, f"{m['hf_tok_per_s']:.0f}", f"{m['nemojax_tok_per_s']:.0f}",
                         f"{m['ratio']:.2f}x ({CPU_VS_HF_GOALS[hidden][metric]}x)",
                         f"{m['ratio_min_max'][0]:.2f}-{m['ratio_min_max'][1]:.2f}", f"{m['cpu_ratio']:.2f}x", frac])
    return rows


def cpu_vs_hf_prose(d, hidden: int):
    goals = CPU_VS_HF_GOALS[hidden]

    def met(key):
        hits = [f"{name} {metric}" for name, r in d["results"].items() for metric in ("train", "decode")
                if r[metric][key] >= goals[metric]]
        return ", ".join(hits) or "none"

    env = d["env"]
    return [f"Width {hidden}: load average {load_range(env)} ({env['date']}, jax {env['jax']}, torch {env['torch']}, "
            f"transformers {env['transformers']}, {d['args']['repeats']} pairs)",
            f"Width {hidden} goals met in wall time: {met('ratio')}; in CPU time: {met('cpu_ratio')}."] + [
        f"{name}: {now:.2f} of its GEMM roofline now, {need:.2f} needed, {cut:.0f}% less time outside the GEMMs"
        for name, now, need, cut in training_goal_gap(d, goals["train"])]


def training_goal_gap(d, goal: float) -> list[tuple[str, float, float, float]]:
    """For each model below the training goal: (name, fraction of its GEMM roofline nemojax's step reaches,
    the fraction at which its step would take HF's time / goal, the % cut in the step's non-GEMM time
    that this needs), from the step's median times and nemojax's GEMM roofline time."""
    out = []
    for name, r in d["results"].items():
        t = r["train"]
        if t["ratio"] < goal:
            gemm, now = t["roofline"]["jax"]["roofline_s"], t["roofline"]["jax"]["fraction"]
            need = gemm / (t["hf_s"] / goal)
            out.append((name, now, need, 100 * (1 - (1 / need - 1) / (1 / now - 1))))
    return out


for _h in CPU_VS_HF:
    table(CPU_VS_HF[_h])(lambda d, h=_h: cpu_vs_hf_rows(d, h))
    prose(BENCH, CPU_VS_HF[_h])(lambda d, h=_h: cpu_vs_hf_prose(d, h))


KERNELS_H200 = {case: f"experiments/benchmarks/results/kernels_h200_{case}.json" for case in ("ssd", "ffn", "ffn_narrow")}


def kernel_rows(d):
    rows = [["op", "shape", "mode", "implementation", "median ms (IQR)", "vs xla", "roofline", "rel err vs xla"]]
    for c in d["cases"]:
        shape = " ".join(f"{k}={v}" for k, v in c["shape"].items())
        for name, r in c["results"].items():
            err = c["rel_err_vs_xla"].get(name)
            rows.append([c["op"], shape, c["mode"], name, f"{r['ms']:.3f} ({100 * r['iqr_rel']:.0f}%)",
                         f"{r['vs_xla']:.2f}x", f"{100 * r['roofline']['fraction']:.1f}% ({r['roofline']['binds']})",
                         "" if err is None else f"{err:.1e}"])
    return rows


def kernel_speedups(d) -> dict[str, float]:
    """mode -> XLA time over the Pallas kernel's time (above 1: the kernel is faster)."""
    return {c["mode"]: 1 / c["results"]["pallas"]["vs_xla"] for c in d["cases"]}


@prose(BENCH, KERNELS_H200["ssd"])
def kernels_h200_prose(d):
    ssd = kernel_speedups(d)
    ffn, narrow = (kernel_speedups(load(KERNELS_H200[k])) for k in ("ffn", "ffn_narrow"))
    return [f"The SSD kernels run the forward {ssd['fwd']:.1f}x and the forward plus backward {ssd['fwd+bwd']:.1f}x "
            "as fast as the XLA path",
            f"At Nemotron-H-8B width the fused FFN is {1 / ffn['fwd']:.0f}x slower than XLA in the forward and "
            f"{1 / ffn['fwd+bwd']:.0f}x in the forward plus backward",
            f"At D = 128 the fused forward is {narrow['fwd']:.2f}x as fast as XLA's, but the forward plus backward "
            f"is {1 / narrow['fwd+bwd']:.1f}x slower"]


for _case, _source in KERNELS_H200.items():
    table(_source)(kernel_rows)


# --------------------------------------------------------------------- experiments/puzzle/README.md
PUZZLE = "experiments/puzzle/README.md"
PARENT = "experiments/puzzle/results/parent.json"


@table(PARENT)
def puzzle_parent_table(d):
    rows = [["run", "layers", "parameters (active)", "held-out loss", "held-out accuracy",
             "seen / unseen training loss", "training time"]]
    for name, r in d["runs"].items():
        p = r["parameters"]
        rows.append([name, f"`{r['pattern']}`", f"{p['total'] / 1e6:.2f}M ({p['active'] / 1e6:.2f}M)",
                     f"{r['held_out']['loss']:.3f}", f"{r['held_out']['accuracy']:.3f}",
                     f"{r['train_seen']['loss']:.3f} / {r['train_unseen']['loss']:.3f}",
                     f"{r['train_seconds'] / 60:.0f} min"])
    return rows


@prose(PUZZLE, PARENT)
def puzzle_parent_prose(d):
    c, runs, rec = d["corpus"], d["runs"], d["recipe"]
    parent = runs["parent"]
    base = [r for k, r in runs.items() if k != "parent"]
    gaps = [r["held_out_gap"] for r in runs.values()]
    return [f"{c['files']} files and {c['bytes'] / 1e6:.2f} MB on Python\n{c['python_version']}"
            .replace("\n", " "),
            f"{c['validation_files']} files ({c['validation_bytes']} bytes, "
            f"{100 * c['validation_bytes'] / c['bytes']:.1f}%)",
            f"({rec['steps']} steps of {rec['batch_size']} × {rec['seq_len']} bytes, "
            f"{parent['tokens_seen'] / 1e6:.2f}M tokens, {d['epochs']:.2f} epochs)",
            d["parent_command"],
            f"all {parent['held_out']['tokens']}\nheld-out tokens".replace("\n", " "),
            f"in its first {parent['held_out']['tokens'] // (rec['batch_size'] * rec['seq_len'])} steps",
            f"by {min(r['held_out']['loss'] for r in base) - parent['held_out']['loss']:.2f} nats",
            f"by at least {100 * (parent['held_out']['accuracy'] - max(r['held_out']['accuracy'] for r in base)):.1f} "
            f"points of accuracy",
            f"only {parent['memorisation_gap']:.3f} nats better",
            f"about {-sum(gaps) / len(gaps):.2f}\nnats lower".replace("\n", " ")]


STUDY = "experiments/puzzle/results/study.json"
STUDY_BASELINES = ("greedy", "max_params", "noop_only", "uniform", "random_best")  # the goal's baselines
SHORT = {"parent": "P", "noop": ".", "linear": "L"}


def short_option(key: str) -> str:
    """'3:mlp_w50' -> 'w50', '1:moe_e25_rcv' -> 'e25r': one cell per layer in the study's tables."""
    name = key.split(":", 1)[1]
    if name in SHORT:
        return SHORT[name]
    for prefix, out in (("mlp_w", "w"), ("mamba_h", "h"), ("attn_kv", "kv"), ("attn_win", "win"), ("moe_top", "top"),
                        ("moe_shared", "sh")):
        if name.startswith(prefix):
            return out + name[len(prefix):]
    size, scorer = name[len("moe_e"):].split("_")
    return f"e{size}{scorer[1]}"  # rcv -> c, rem -> e


def budget_label(b) -> str:
    """'decode_latency 0.5', or 'decode_latency 0.5 (H100 roofline)' for a budget on the roofline estimate."""
    (name, frac), = b["budget"].items()
    return f"{name} {frac:g}" + (" (H100 roofline)" if b.get("latency") == "roofline" else "")


@table(STUDY)
def puzzle_study_table(d):
    acc = d["parent"]["eval"]["accuracy"]
    rows = [["budget", "child", "layers", "summed layer cost", "decode speedup", "prefill speedup", "KL before",
             "accuracy before", "KL after", "accuracy after"]]
    for b in d["budgets"].values():
        if "children" not in b:
            continue
        column = f"{next(iter(b['budget']))}@{b['batch_size']}"
        for method, r in b["children"].items():
            after = r.get("after")
            rows.append([budget_label(b), method, " ".join(short_option(k) for k in r["keys"]),
                         f"{r['relative_cost'][column]:.2f}", f"{r['speedup']['decode']:.2f}x",
                         f"{r['speedup']['prefill']:.2f}x", f"{r['before']['kl']:.3f}",
                         f"{100 * r['before']['accuracy'] / acc:.1f}%",
                         f"{after['kl']:.3f}" if after else "-",
                         f"{100 * after['accuracy'] / acc:.1f}%" if after else "-"])
    return rows


def seed_stats(d, row, key: str) -> tuple[float, float, float]:
    """(mean, min, max) over the distillation seeds of accuracy (as % of the parent's) or KL."""
    scale = 100 / d["parent"]["eval"]["accuracy"] if key == "accuracy" else 1
    values = [r[key] * scale for r in row["after_seeds"]]
    return mean(values), min(values), max(values)


@table(STUDY + "#seeds")
def puzzle_seeds_table(d):
    rows = [["budget", "child", "seeds", "accuracy after, mean (range)", "KL after, mean (range)"]]
    for b in d["budgets"].values():
        for method, r in b.get("children", {}).items():
            if "after_seeds" in r:
                acc, kl = seed_stats(d, r, "accuracy"), seed_stats(d, r, "kl")
                rows.append([budget_label(b), method, str(len(r["after_seeds"])),
                             f"{acc[0]:.1f}% ({acc[1]:.1f}-{acc[2]:.1f})", f"{kl[0]:.3f} ({kl[1]:.3f}-{kl[2]:.3f})"])
    return rows


@table(STUDY + "#calibration")
def puzzle_calibration_table(d):
    rows = [["budget", "child", "scale of the budget searched under", "summed layer cost", "measured, calibration",
             "measured, final timing"]]
    for b in d["budgets"].values():
        for method, r in b.get("children", {}).items():
            if "calibration" in r:
                c, summed = r["calibration"], r["relative_cost"][f"decode_latency@{b['batch_size']}"]
                rows.append([budget_label(b), method, f"{c['scale']:.2f}", f"{summed:.2f}",
                             f"{c['measured']:.2f}", f"{1 / r['speedup']['decode']:.2f}"])
    return rows


def join_and(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def seeded_comparison(d, b) -> str:
    """One sentence on budget `b`: the distilled MIP child's accuracy over its seeds, its measured decode
    speedup, and how its seeds compare with those of the baselines distilled as often."""
    goal = b["children"]
    mip = goal["mip"]
    repeated = [m for m, r in goal.items() if m != "mip" and "after_seeds" in r]
    acc, kl = seed_stats(d, mip, "accuracy"), seed_stats(d, mip, "kl")
    above = [m for m in repeated if acc[1] > seed_stats(d, goal[m], "accuracy")[2]]
    below = [m for m in repeated if kl[2] < seed_stats(d, goal[m], "kl")[1]]

    def relation(metric, better, word):
        rest = sorted(set(repeated) - set(better))
        return ([f"in {metric} every seed of the MIP child is {word} every seed of {join_and(better)}"] * bool(better)
                + [f"in {metric} its seed range and that of {join_and(rest)} overlap"] * bool(rest))

    speed = f"a decode speedup of {mip['speedup']['decode']:.2f}x measured here"
    if b.get("latency") == "roofline":
        cost = mip["relative_cost"][f"decode_latency@{b['batch_size']}"]
        speed = f"a decode speedup of {1 / cost:.2f}x on the H100 roofline ({mip['speedup']['decode']:.2f}x measured here)"
    return (f"At {budget_label(b)} the MIP child keeps {acc[0]:.1f}% of the parent's accuracy ({acc[1]:.1f}-{acc[2]:.1f} "
            f"over {len(mip['after_seeds'])} seeds) at {speed}; "
            + "; ".join(relation("accuracy", above, "above") + relation("KL", below, "below")))


def lm_scores_comparison(b) -> str:
    """How the MIP child searched on LM-loss scores ends, in KL, against the KL-scored MIP child's seeds."""
    low = min(r["kl"] for r in b["children"]["mip"]["after_seeds"])
    verdict = "a lower KL than any" if b["children"]["mip_lm_scores"]["after"]["kl"] < low else "a KL no lower than one"
    return f"at {budget_label(b)} mip_lm_scores ends with {verdict} of the MIP child's seeds"


def distillation_order(d, b) -> str:
    """The distilled children of budget `b` in order of accuracy, e.g. 'mip 99.4% > noop_only 98.8% > ...'."""
    acc = d["parent"]["eval"]["accuracy"]
    rows = sorted(((m, r["after"]["accuracy"]) for m, r in b["children"].items() if "after" in r and m != "mip_lm_scores"),
                  key=lambda x: -x[1])
    order = [m for m, _ in rows]
    assert order.index("mip") < order.index("greedy") < order.index("max_params"), order  # the paper's shape
    return f"at {budget_label(b)}: " + " > ".join(f"{m} {100 * a / acc:.1f}%" for m, a in rows)


def lm_distillation(d, label, r) -> str:
    """Where the MIP child distilled with the LM loss added lands against its cos + KL seeds."""
    acc = d["parent"]["eval"]["accuracy"]
    lm, seeds = r["after_lm"]["accuracy"], [x["accuracy"] for x in r["after_seeds"]]
    assert lm >= min(seeds), label  # "adding the LM loss does not hurt"
    where = "above" if lm > max(seeds) else "within"
    return f"{100 * lm / acc:.1f}% at {label} ({where} its cos + KL seeds' range)"


@prose(PUZZLE, STUDY)
def puzzle_study_prose(d):
    acc = d["parent"]["eval"]["accuracy"]
    seeded = {n: b for n, b in d["budgets"].items() if "after_seeds" in b.get("children", {}).get("mip", {})}
    no_child = {}
    for b in d["budgets"].values():
        for method in b.get("infeasible", {}):
            no_child.setdefault(method, []).append(budget_label(b))
    m, lat = d["meta"], d["latency_setting"]
    sb, eb = m["score_batches"], m["eval_batches"]
    on_cpu = [b for b in seeded.values() if b["latency"] == "measured"]  # the goal's budgets on this CPU
    calibrated = [(b, r) for b in d["budgets"].values() for r in b.get("children", {}).values() if "calibration" in r]
    summed = [r["relative_cost"][f"decode_latency@{b['batch_size']}"] / r["calibration"]["measured"]
              for b, r in calibrated]
    moved = [abs(1 / r["speedup"]["decode"] / r["calibration"]["measured"] - 1) for _, r in calibrated]

    def best_seeds(b):  # per distilled baseline, its best seed's accuracy (its one distillation's if one)
        return {name: max(x["accuracy"] for x in r.get("after_seeds", [r["after"]]))
                for name, r in b["children"].items() if name in STUDY_BASELINES and "after" in r}

    def wins(b):  # the MIP child's lowest seed above every baseline's best
        low = min(x["accuracy"] for x in b["children"]["mip"]["after_seeds"])
        return all(a < low for a in best_seeds(b).values())

    def others_below(b):
        assert wins(b), b["budget"]
        single = [(name, a) for name, a in best_seeds(b).items() if "after_seeds" not in b["children"][name]]
        return (f"at {budget_label(b)} the baselines distilled once ("
                + join_and([f"{name} {100 * a / acc:.1f}%" for name, a in single]) + ") end below the MIP child's lowest seed")

    met = all(wins(b) and seed_stats(d, b["children"]["mip"], "accuracy")[1] >= 97 for b in on_cpu)
    lm_lower = [b["children"]["mip_lm_scores"]["after"]["kl"] < min(r["kl"] for r in b["children"]["mip"]["after_seeds"])
                for b in seeded.values()]
    return [f"{m['bld_tokens']} tokens per candidate",
            # the latency prompts are seq_len - new_tokens long (study.py), so their sum is the training length
            f"{m['distill_steps']} steps of {m['distill_batch']} sequences of {lat['prompt'] + lat['new_tokens']} bytes",
            f"the replace-one scores use held-out batches 0-{sb - 1}",
            f"on held-out batches {sb}-{sb + eb - 1}, which chose nothing",
            f"{lat['batch']} held-out prompts of {lat['prompt']} bytes",
            f"then {lat['new_tokens']} decode steps, which fill the cache to the {lat['prompt'] + lat['new_tokens']} "
            "positions",
            f"a bisection over {lat['calibration_steps']} scales, each child timed in turns with the parent over "
            f"{lat['calibration_rounds']} rounds",
            f"timed again in turns with the parent over {lat['rounds']} rounds",
            f"with {m['distill_seeds']} data orders",
            f"the layers' summed costs are {min(summed):.2f}-{max(summed):.2f}x the measured latency of the same child",
            f"a child's measured latency moved by up to {100 * max(moved):.0f}% between the two timings",
            "The goal is " + ("met" if met else "not met") + " on this CPU's measured latencies"] + [
            seeded_comparison(d, b) for b in seeded.values()] + [others_below(b) for b in seeded.values()] + [
            lm_scores_comparison(b) for b in seeded.values()] + [
            ("So KL scores do as well as LM-loss scores or better here, as the paper found" if not any(lm_lower)
             else "So LM-loss scores end lower in KL at " + join_and(
                [budget_label(b) for b, low in zip(seeded.values(), lm_lower) if low]))] + [
            f"at {budget_label(b)} the MIP child removes or linearises "
            f"{sum(k.endswith((':noop', ':linear')) for k in b['children']['mip']['keys'])} of its "
            f"{len(b['children']['mip']['keys'])} layers" for b in seeded.values()] + [
            distillation_order(d, b) for b in seeded.values()] + [
            "the MIP child with the LM loss added to its distillation keeps " + join_and(
                [lm_distillation(d, budget_label(b), b["children"]["mip"]) for b in seeded.values()])] + [
            f"{method} has no child at {', '.join(where)}" for method, where in no_child.items()]


# ---------------------------------------------------------------------- experiments/fusion/README.md
FUSION = "experiments/fusion/README.md"
THEORY = "experiments/fusion/results/theory.json"
THEORY_OPS = ("remove", "linear", "fuse")
THEORY_LABELS = {"alpha_law": "alpha-order law", "ntk_surgery": "residual NTK, output change",
                 "ntk_kernel": "residual NTK, kernel change", "empirical_ntk": "empirical NTK change",
                 "local_error": "local error", "rel_norm": "alpha alone", "cos_dist_x_fx": "1 - cos(x, f(x))",
                 "cos_h_x": "abs cos(h, x)", "dependency": "dependency M[j, j+1]"}
LAYER_KINDS = {"M": "Mamba", "E": "MoE", "*": "attention", "-": "MLP"}


def theory_candidates(d):
    return {(r["layer"], r["op"]): r for r in d["candidates"]}


def fusion_ranks(d, values):
    """Rank (1 = most damaging) of each fusion, by `values(row)`, keyed by its first layer."""
    rows = sorted((r for r in d["candidates"] if r["op"] == "fuse"), key=values, reverse=True)
    return {r["layer"]: k + 1 for k, r in enumerate(rows)}


@table(THEORY)
def theory_table(d):
    rows = [["predictor", *THEORY_OPS, "all"]]
    for name, label in THEORY_LABELS.items():
        s = d["spearman"][name]
        rows.append([label] + [f"{f2(s[op]['rho'])} (p={s[op]['p']:.2g})" if op in s else "-"
                               for op in (*THEORY_OPS, "all")])
    return rows


@table(THEORY + "#layers")
def theory_layers_table(d):
    c, pattern = theory_candidates(d), d["meta"]["pattern"]
    rows = [["layer", "kind", "alpha", "KL, remove", "KL, linear", "KL, fuse with the next layer"]]
    for j, alpha in enumerate(d["layer_stats"]["alpha"]):
        rows.append([str(j), LAYER_KINDS[pattern[j]], f"{alpha:.3f}"]
                    + [f"{c[(j, op)]['measured']['kl']:.3g}" if (j, op) in c else "-" for op in THEORY_OPS])
    return rows


@prose(FUSION, THEORY)
def theory_prose(d):
    m, s, c, alpha = d["meta"], d["spearman"], theory_candidates(d), d["layer_stats"]["alpha"]
    n = m["layers"]

    def rho(name, op="all"):
        return f2(s[name][op]["rho"])

    def p(name, op="all"):
        return f"{s[name][op]['p']:.2g}"

    def kl(j, op):
        return c[(j, op)]["measured"]["kl"]

    def pred(j, op, name):
        return c[(j, op)]["predicted"][name]

    # the qualitative claims, checked before their numbers are rendered
    overall = sorted((x for x in s if "all" in s[x]), key=lambda x: -s[x]["all"]["rho"])
    assert overall[:4] == ["local_error", "ntk_kernel", "ntk_surgery", "alpha_law"], overall
    assert all(s[x]["all"]["rho"] >= 0.8 for x in overall[:4])
    everywhere = [x for x in s if all(op in s[x] and s[x][op]["rho"] >= 0.8 for op in THEORY_OPS)]
    assert everywhere == ["local_error"], everywhere
    for op, best in (("remove", "cos_dist_x_fx"), ("linear", "cos_dist_x_fx"), ("fuse", "empirical_ntk")):
        assert max((x for x in s if op in s[x]), key=lambda x: s[x][op]["rho"]) == best, op
    for j in range(n - 1):  # "fusing did less damage than linearising, and linearising less than removing"
        assert kl(j, "fuse") < kl(j, "linear") < kl(j, "remove"), j
    assert kl(n - 1, "linear") < kl(n - 1, "remove")
    for op in THEORY_OPS:  # "layer 0 is the most damaging candidate of every operation"
        assert max((k for k in c if k[1] == op), key=lambda k: kl(*k))[0] == 0, op
    # the layer kinds the text names: Mamba 0, 4 and 6; attention 2 and 8, each followed by an MoE layer; MoE 7
    pattern = m["pattern"]
    assert (pattern[0], pattern[4], pattern[6], pattern[2:4], pattern[7:10]) == ("M", "M", "M", "*E", "E*E")
    law = fusion_ranks(d, lambda r: r["predicted"]["alpha_law"])
    measured = fusion_ranks(d, lambda r: r["measured"]["kl"])
    entk = fusion_ranks(d, lambda r: r["predicted"]["empirical_ntk"])

    def pooled_rank(key):  # mean rank (1 = most damaging) of the linearisations among all candidates
        order = sorted(d["candidates"], key=key, reverse=True)
        return mean(k for k, r in enumerate(order) if r["op"] == "linear")

    # "the law ranks linearisations too low among all candidates"
    assert pooled_rank(lambda r: r["predicted"]["alpha_law"]) > pooled_rank(lambda r: r["measured"]["kl"])
    counts = [s["alpha_law"][op]["n"] for op in THEORY_OPS]

    fused = [pred(j, "fuse", "local_error") / (alpha[j] * alpha[j + 1]) for j in range(n - 1)]
    assert sorted(range(n - 1), key=lambda j: -fused[j])[:2] == [8, 2]  # "the two largest ratios"
    theory_only = {s[x]["fuse"]["rho"] for x in ("alpha_law", "ntk_surgery", "ntk_kernel")}
    assert len(theory_only) == 1 and max(theory_only) < 0.8
    kept = [pred(j, "linear", "local_error") / alpha[j] for j in range(n)]
    cost = [kl(j, "linear") / kl(j, "remove") for j in range(n)]
    return [
        f"({m['seconds'] / 60:.0f} min on the shared {m['cpus']}-core machine, jax {m['jax']})",
        f"(`{m['pattern']}`, {n} layers;",
        f"builds {len(d['candidates'])} candidates",
        f"on {m['heldout_tokens']} held-out tokens",
        f"on {m['calibration_tokens']} calibration tokens of the training split",
        f"with the measured alphas and depth {n}",
        f"at the last position of {m['ntk_windows']} windows of {m['ntk_context']} bytes",
        f"({counts[0]}, {counts[1]} and {counts[2]} candidates) and over all {sum(counts)}",
        f"With {min(counts)}-{max(counts)} candidates per operation",
        f"but cannot compare operations, reaches only {rho('rel_norm')} overall",
        f"Over all {len(d['candidates'])} candidates the local error (rho = {rho('local_error')}, "
        f"p = {p('local_error')}) and the residual NTK's kernel change (rho = {rho('ntk_kernel')}, "
        f"p = {p('ntk_kernel')}) rank the damage best. The residual NTK's output change ({rho('ntk_surgery')}) "
        f"and the alpha-order law ({rho('alpha_law')}) follow.",
        f"The local error is the only predictor with rho >= 0.8 in every operation "
        f"({', '.join(rho('local_error', op) for op in THEORY_OPS)}).",
        f"1 - cos(x, f(x)) is best for remove ({rho('cos_dist_x_fx', 'remove')}) and linear "
        f"({rho('cos_dist_x_fx', 'linear')}), and the empirical NTK is best for fuse ({rho('empirical_ntk', 'fuse')})",
        f"1 - cos(x, f(x)) reaches {rho('cos_dist_x_fx', 'fuse')} on fuse and {rho('cos_dist_x_fx')} overall, "
        f"and the empirical NTK {rho('empirical_ntk', 'linear')} on linear",
        f"A fusion's local error is {span(fused)}x the law's estimate",
        f"leaves {span(kept)} of a layer's contribution",
        f"leaves sqrt(1/2 - 1/pi) = {math.sqrt(0.5 - 1 / math.pi):.2f}",
        f"costs {span(cost)}x the layer's removal, instead of the law's 1/2 - 1/pi = {0.5 - 1 / math.pi:.2f}x",
        f"For the Mamba layers 4 and 6 it costs {cost[4]:.2f}x and {cost[6]:.2f}x their removal",
        f"({rho('alpha_law')} overall, against {rho('local_error')} for the local error",
        f"Layer 0 (the Mamba layer that reads the embeddings) has alpha = {alpha[0]:.1f}",
        f"predicts a relative change of {pred(0, 'remove', 'alpha_law'):.0f}",
        f"the cross-kernel output change saturates at {pred(0, 'remove', 'ntk_surgery'):.2f}",
        f"only the alphas all reach rho = {rho('alpha_law', 'fuse')} (p = {p('alpha_law', 'fuse')}), below the "
        "goal's 0.8",
        f"the fused perturbation is {fused[2]:.2f}x and {fused[8]:.2f}x the law's estimate",
        f"{law[2]}th of {n - 1}, but 2:fuse is measured {measured[2]}rd",
        f"It ranks 7:fuse (MoE 7, then attention 8) {law[7]}th, but 7:fuse is measured {measured[7]}th",
        f"comes closer on both ({entk[2]}nd and {entk[7]}th)",
        f"(rho = {rho('dependency', 'fuse')}, p = {p('dependency', 'fuse')})",
        f"(rho = {rho('empirical_ntk', 'linear')}, p = {p('empirical_ntk', 'linear')})",
        f"(removal: {rho('empirical_ntk', 'remove')})",
    ]


FUSION_STUDY = "experiments/fusion/results/study.json"


def latency_ratio(d, name, phase, ref="base"):
    return d["latency"][name][phase] / d["latency"][ref][phase]


@table(FUSION_STUDY)
def fusion_study_table(d):
    acc = d["base"]["eval"]["accuracy"]
    rows = [["child of the base", "layers", "KL to the base", "accuracy / base's", "after distillation",
             "prefill latency / base's", "decode latency / base's"]]
    for name, r in d["children"].items():
        after = r.get("after")
        rows.append([name, f"`{r['pattern']}`", f"{r['before']['kl']:.3f}", f"{100 * r['before']['accuracy'] / acc:.1f}%",
                     f"{100 * after['accuracy'] / acc:.1f}%" if after else "-",
                     f"{latency_ratio(d, name, 'prefill'):.2f} ({d['latency'][name]['prefill_spread']:.2f})",
                     f"{latency_ratio(d, name, 'decode'):.2f} ({d['latency'][name]['decode_spread']:.2f})"])
    return rows


@table(FUSION_STUDY + "#blocks")
def fusion_blocks_table(d):
    acc = d["parent"]["eval"]["accuracy"]
    rows = [["windows of", "parallelised (greedy order)", "layers", "KL to the parent", "accuracy / parent's",
             "decode latency / parent's"]]
    for size, runs in d["blocks"].items():
        for n, r in enumerate(runs, start=1):
            rows.append([size, ", ".join(f"{a}-{b - 1}" for a, b in r["windows"]), f"`{r['pattern']}`",
                         f"{r['before']['kl']:.3f}", f"{100 * r['before']['accuracy'] / acc:.1f}%",
                         f"{latency_ratio(d, f'blocks{size} x{n}', 'decode', 'parent'):.2f}"])
    return rows


@table(FUSION_STUDY + "#stats")
def fusion_stats_table(d):
    pattern, st = d["base"]["pattern"], d["residual_stats"]
    rows = [["layer of the base", "kind", "cos-dist(x, f(x))", "abs h / abs x", "cos(h, x)", "replace-one KL"]]
    for j, kind in enumerate(pattern):
        if kind != ".":
            rows.append([str(j), LAYER_KINDS[kind], f"{st['cos_dist_x_fx'][j]:.3f}", f"{st['rel_norm'][j]:.3f}",
                         f"{st['cos_h_x'][j]:.3f}", f"{d['ffn_importance'][str(j)]:.3f}"
                         if str(j) in d["ffn_importance"] else "-"])
    return rows


@prose(FUSION, FUSION_STUDY)
def fusion_study_prose(d):
    c, base_acc, m = d["children"], d["base"]["eval"]["accuracy"], d["meta"]

    def acc(name, stage="before"):
        return f"{100 * c[name][stage]['accuracy'] / base_acc:.1f}%"

    def kl(name):
        return f"{c[name]['before']['kl']:.3f}"

    # the qualitative claims the text makes
    assert c["fuse 3-7"]["before"]["kl"] > c["fuse 1-5"]["before"]["kl"]  # fusing the last FFN costs more
    assert c["reversed 1-5"]["before"]["kl"] > c["fuse 1-5"]["before"]["kl"]  # reordering costs more than fusing
    assert c["fuse 1-7"]["before"]["kl"] > c["fuse 1-5"]["before"]["kl"] > c["fuse 1-3"]["before"]["kl"]
    blocks = [r["before"]["accuracy"] / d["parent"]["eval"]["accuracy"] for rows in d["blocks"].values() for r in rows]
    assert min(blocks) > 0.5  # no collapse
    assert c["remove 2 FFN"]["before"]["kl"] > c["fuse 1-5"]["before"]["kl"]
    rel = [x for x in d["residual_stats"]["rel_norm"] if x is not None]
    spreads = [v[f"{phase}_spread"] for v in d["latency"].values() for phase in ("prefill", "decode")]

    def decode(names):
        return [latency_ratio(d, n, "decode") for n in names]
    sb, eb, lat = m["score_batches"], m["eval_batches"], d["latency_setting"]
    return [f"{m['base_steps']} steps of {m['distill_batch']} sequences of {m['seq_len']} bytes",
            f"held-out batches {sb}-{sb + eb - 1} (held-out batches 0-{sb - 1}",
            f"distilled from that model for {m['distill_steps']} steps",
            f"prefill of {lat['batch']} held-out prompts of {lat['prompt']} bytes",
            f"one decode step at batch {lat['batch']}",
            f"After {m['distill_steps']} steps of distillation",
            f"keeps {100 * d['base']['vs_parent']['accuracy'] / d['parent']['eval']['accuracy']:.1f}% of the parent's",
            f"KL {kl('fuse 1-3')}, {kl('fuse 1-5')} and {kl('fuse 1-7')}",
            f"{acc('fuse 1-3', 'after')}, {acc('fuse 1-5', 'after')} and {acc('fuse 1-7', 'after')}",
            f"3-7 costs KL {kl('fuse 3-7')} against {kl('fuse 1-5')}",
            f"{acc('fuse 3-7', 'after')} against {acc('fuse 1-5', 'after')}",
            f"in reversed order costs KL {kl('reversed 1-5')}",
            f"fold: KL {kl('fuse 1-5 fold')} and {kl('fuse 1-7 fold')} against {kl('fuse 1-5')} and {kl('fuse 1-7')}",
            f"removing it costs KL {kl('remove 1 FFN')}",
            f"{acc('remove 1 FFN', 'after')} after distillation",
            f"lowest is {100 * min(blocks):.1f}%",
            f"Removing two costs more than fusing three (KL {kl('remove 2 FFN')})",
            f"abs x of {span(rel[1:])} after the first layer",
            f"spreads of {span(spreads, lambda x: f'{x:.1f}')}x over rounds",
            f"the fused children decode at {span(decode(n for n in c if n.startswith('fuse')))}x the base's "
            f"latency and the pruned ones at {span(decode(n for n in c if n.startswith('remove')))}x"]


# ------------------------------------------------------------------------ experiments/precision/README.md
PRECISION = "experiments/precision/README.md"
KV_CACHE = "experiments/precision/results/kv_cache.json"
KV_CACHE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "fp8": "FP8 E4M3, calibrated",
                  "fp8_uncalibrated": "FP8 E4M3, scale 1"}


TRAINING = "experiments/precision/results/training.json"
TRAINING_MAIN = ("bf16", "fp8", "nvfp4", "nvfp4-then-bf16", "bf16-seed1")
TRAINING_ABLATIONS = {"nvfp4": "nothing (the recipe)", "nvfp4-no-2d": "16x16 weight tiles (1x16 blocks instead)",
                      "nvfp4-no-rht": "random Hadamard transform", "nvfp4-no-sr": "stochastic rounding (nearest)",
                      "nvfp4-no-bf16-layers": "BF16 first and last layers"}


def quantised_matmuls(runs, run: str) -> str:
    """Which layers' matmuls a training run quantised, in what format (the switched run: nvfp4's, then none)."""
    r = runs[run]
    if r["config_changes"]:
        return f"{quantised_matmuls(runs, 'nvfp4')} to step {r['config_changes'][0]['step']}, then none"
    layers = r["quantised_layers"]
    return f"{r['precision'].upper()} in layers {layers[0]}-{layers[-1]}" if layers else "none"


def signed_pct(x: float, base: float) -> str:
    return f"{100 * (x - base) / base:+.2f}%"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


@table(TRAINING)
def training_table(d):
    runs = d["runs"]
    base = runs["bf16"]["held_out_loss"]
    rows = [["run", "quantised matmuls", "training loss, last 20% of steps", "held-out loss", "vs bf16",
             "held-out loss, weights unquantised", "wall time"]]
    for run in TRAINING_MAIN:
        r = runs[run]
        unq = r.get("held_out_loss_unquantised")
        rows.append([run, quantised_matmuls(runs, run), f"{r['final_train_loss']:.4f}", f"{r['held_out_loss']:.4f}",
                     signed_pct(r["held_out_loss"], base), "-" if unq is None else f"{unq:.4f}",
                     minutes(r["wall_seconds"])])
    return rows


@table(TRAINING + "#ablations")
def training_ablations_table(d):
    runs = d["runs"]
    base, recipe = runs["bf16"]["held_out_loss"], runs["nvfp4"]["held_out_loss"]
    rows = [["run", "switched off", "quantised layers", "training loss, last 20% of steps", "held-out loss",
             "vs bf16", "vs nvfp4", "wall time"]]
    for run, off in TRAINING_ABLATIONS.items():
        r = runs[run]
        layers = r["quantised_layers"]
        rows.append([run, off, f"{layers[0]}-{layers[-1]}", f"{r['final_train_loss']:.4f}", f"{r['held_out_loss']:.4f}",
                     signed_pct(r["held_out_loss"], base), signed_pct(r["held_out_loss"], recipe),
                     minutes(r["wall_seconds"])])
    return rows


@table(TRAINING + "#curves")
def training_curves_table(d):
    runs = d["runs"]
    steps = [s for s, _ in runs["bf16"]["curve"]["held_out"] if s > 0][1::2]
    rows = [["held-out loss at step"] + [str(s) for s in steps]]
    for run in runs:
        at = dict(map(tuple, runs[run]["curve"]["held_out"]))
        rows.append([run] + [f"{at[s]:.4f}" for s in steps])
    return rows


@prose(PRECISION, TRAINING)
def training_prose(d):
    m, runs = d["meta"], d["runs"]
    held = {run: r["held_out_loss"] for run, r in runs.items()}
    quantised = [run for run in runs if run not in ("bf16", "bf16-seed1")]
    pct = {run: signed_pct(held[run], held["bf16"]) for run in runs}
    vs_recipe = {run: signed_pct(held[run], held["nvfp4"]) for run in TRAINING_ABLATIONS}
    unquantised = {run: runs[run]["held_out_loss_unquantised"] for run in quantised if run != "nvfp4-then-bf16"}
    # the qualitative claims the text makes
    assert all(abs(held[run] - held["bf16"]) < 0.01 * held["bf16"] for run in quantised)
    assert 0 < held["fp8"] - held["bf16"] < held["nvfp4"] - held["bf16"]
    assert held["nvfp4-no-sr"] < held["bf16"]
    assert all(held[run] < 0.995 * held["nvfp4"] for run in ("nvfp4-no-sr", "nvfp4-no-2d"))  # "well below"
    assert abs(held["nvfp4-no-rht"] - held["nvfp4"]) < 0.001 * held["nvfp4"]  # "about the same"
    worst = "nvfp4-no-bf16-layers"
    assert all(held[worst] >= held[run] for run in runs)
    assert all(runs[worst]["final_train_loss"] >= r["final_train_loss"] for r in runs.values())
    assert abs(held["nvfp4-then-bf16"] - held["nvfp4"]) < 0.001
    lo, hi = (signed_pct(f(held[run] for run in quantised), held["bf16"]) for f in (min, max))
    p = m["parameters"]
    tokens = m["recipe"]["steps"] * m["tokens_per_step"]
    return [f"`{m['pattern']}`", f"lr {m['recipe']['lr']}", f"checkpoint at step {m['switch_step']}",
            f"first {m['held_out_tokens']} bytes of held-out files",
            f"{p['total'] / 1e6:.1f}M parameters ({p['active'] / 1e6:.1f}M active)",
            f"{m['recipe']['steps']} steps of {m['tokens_per_step']} bytes ({tokens} bytes",
            f"took {sum(r['wall_seconds'] for r in runs.values()) / 60:.1f} minutes in all",
            f"(jax {m['jax']}, {m['device']}, {m['date']})", f"from {lo} to {hi}",
            f"seeds end {pct['bf16-seed1'].lstrip('+-')} apart ({abs(held['bf16-seed1'] - held['bf16']):.3f} nats)",
            f"FP8 ends {pct['fp8']} and NVFP4 {pct['nvfp4']} above bf16",
            f"{runs['fp8']['final_train_loss']:.4f} and {runs['nvfp4']['final_train_loss']:.4f} against bf16's "
            f"{runs['bf16']['final_train_loss']:.4f}",
            f"lower than the recipe ({vs_recipe['nvfp4-no-sr']}) and lower than bf16 ({pct['nvfp4-no-sr']})",
            f"also ended lower than the recipe ({vs_recipe['nvfp4-no-2d']})",
            f"about the same as the recipe ({vs_recipe['nvfp4-no-rht']})",
            f"higher than the recipe ({vs_recipe[worst]})",
            f"(steps {m['switch_step'] + 1}-{m['recipe']['steps']})",
            f"({held['nvfp4-then-bf16']:.4f} against {held['nvfp4']:.4f})",
            f"none of nvfp4's {held['nvfp4'] - held['bf16']:.3f}-nat gap",
            f"the first {m['switch_step']} are the `nvfp4` run's",
            f"at most {max(abs(unquantised[run] - held[run]) for run in unquantised):.4f} nats",
            f"(nvfp4: {unquantised['nvfp4']:.4f} against {held['nvfp4']:.4f} as trained)",
            m["commands"]["nvfp4"]]


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def diverged(d, kv) -> int:
    """Greedy continuations that differ somewhere from the reference cache's."""
    m = d["meta"]
    return m["prompts"] - round(d["greedy"][kv]["vs_" + m["reference"]]["identical_prompts"] * m["prompts"])


@table(KV_CACHE)
def kv_cache_table(d):
    m = d["meta"]
    rows = [["cache", "K/V bytes per token", f"K/V cache, {m['prompts']} x {m['prompt_len'] + m['new_tokens']} tokens",
             "whole cache", "held-out loss", "KL to float32", "greedy tokens as float32", "continuations that differ",
             "tokens before the first difference"]]
    for kv in m["caches"]:
        mem, loss, g = d["memory"][kv], d["loss"][kv], d["greedy"][kv]["vs_" + m["reference"]]
        rows.append([KV_CACHE_NAMES[kv], str(mem["per_token"]), mib(mem["generation"]["attention_kv"]),
                     mib(mem["generation"]["total"]), f"{loss['loss']:.5f}", f"{loss['kl_to_reference']:.1e}",
                     f"{100 * g['token_agreement']:.1f}%", f"{diverged(d, kv)} of {m['prompts']}",
                     f"{g['mean_tokens_before_first_difference']:.1f}"])
    return rows


@table(KV_CACHE + "#layers")
def kv_cache_layers_table(d):
    rows = [["layer", "", "scale", "amax: calibration / held-out", "relative RMS error", "below 2^-6",
             "above 448"]]
    for name, q in d["quantisation"].items():
        for t in ("k", "v"):
            x = q[t]
            cal, one = x["fp8"], x["fp8_uncalibrated"]
            rows.append([name, t.upper(), f"{x['scale']:.2e}", f"{x['calibration_amax']:.2f} / {x['heldout_amax']:.2f}",
                         f"{100 * cal['rel_rms_error']:.2f}% / {100 * one['rel_rms_error']:.2f}%",
                         f"{100 * cal['below_min_normal']:.3f}% / {100 * one['below_min_normal']:.3f}%",
                         f"{cal['clipped']:.1e} / {one['clipped']:.1e}"])
    return rows


@table(KV_CACHE + "#range")
def kv_cache_range_table(d):
    rows = [["K and V x", "held-out amax", "KL, float32 cache", "KL, FP8 calibrated", "KL, FP8 scale 1",
             "loss, FP8 calibrated", "loss, FP8 scale 1"]]
    for r in d["range"]:
        amax = [a for pair in r["kv_amax"].values() for a in pair]
        rows.append([f"2^{r['exponent']}", span(amax, lambda x: f"{x:.3g}" if x < 100 else f"{x:.0f}"),
                     f"{r['float32']['kl_to_reference']:.1e}",
                     f"{r['fp8']['kl_to_reference']:.1e}", f"{r['fp8_uncalibrated']['kl_to_reference']:.1e}",
                     f"{r['fp8']['loss']:.4f}", f"{r['fp8_uncalibrated']['loss']:.4f}"])
    return rows


@prose(PRECISION, KV_CACHE)
def kv_cache_prose(d):
    m, loss, mem, rng = d["meta"], d["loss"], d["memory"], d["range"]
    base = next(r for r in rng if r["exponent"] == 0)
    # the qualitative claims the text makes
    assert all(r["float32"]["kl_to_reference"] == 0 for r in rng)  # the rescaled models are the same function
    assert len({(r["fp8"]["loss"], r["fp8"]["kl_to_reference"]) for r in rng}) == 1  # calibration follows the range
    assert all(r["fp8_uncalibrated"]["kl_to_reference"] > 5 * base["fp8_uncalibrated"]["kl_to_reference"]
               for r in rng if r["exponent"] != 0)
    assert max(abs(loss[kv]["loss"] - loss["float32"]["loss"]) for kv in m["caches"]) < 1e-4
    assert mem["fp8"]["per_token"] * 4 == mem["float32"]["per_token"] == mem["bfloat16"]["per_token"] * 2
    assert diverged(d, "bfloat16") < diverged(d, "fp8") < diverged(d, "fp8_uncalibrated")
    assert all(x["heldout_amax"] > x["calibration_amax"] for layer in d["quantisation"].values()
               for x in layer.values())  # so the calibrated cache clips a few held-out entries
    worst = max(rng, key=lambda r: r["fp8_uncalibrated"]["kl_to_reference"])
    shift = {r["exponent"]: r["fp8_uncalibrated"]["kl_to_reference"] / base["fp8_uncalibrated"]["kl_to_reference"]
             for r in rng}
    kv_bytes = {kv: mem[kv]["generation"]["attention_kv"] for kv in m["caches"]}
    q = [x for layer in d["quantisation"].values() for x in layer.values()]

    def pct(values):
        return span([100 * v for v in values], lambda x: f"{x:.1f}")
    return [m["command"], f"{m['calibration_tokens']} tokens of the training split",
            f"{m['heldout_tokens']} held-out tokens, windows of {m['window']} whose first {m['prefill']} tokens",
            f"(plus {kv_bytes['fp8'] - kv_bytes['float32'] // 4} bytes of scales)",
            f"about {loss['fp8']['kl_to_reference'] / loss['bfloat16']['kl_to_reference']:.0f} times bfloat16's",
            f"the KL grows {shift[-8]:.0f}-fold", f"it grows {shift[8]:.0f}-fold",
            f"{m['prompts']} held-out prompts of {m['prompt_len']} tokens", f"{m['new_tokens']} tokens each",
            f"{m['range_batches'] * m['heldout_tokens'] // m['heldout_batches']} held-out tokens",
            f"about {m['seconds'] / 60:.0f} minutes",
            f"differ in {diverged(d, 'fp8')} of {m['prompts']} continuations with the calibrated scales and in "
            f"{diverged(d, 'fp8_uncalibrated')} with scale 1 ({diverged(d, 'bfloat16')} with bfloat16)",
            f"(KL {loss['fp8']['kl_to_reference']:.1e} and {loss['fp8_uncalibrated']['kl_to_reference']:.1e} "
            f"nats per token)",
            f"a KL of {worst['fp8_uncalibrated']['kl_to_reference']:.2f} nats and a held-out loss of "
            f"{worst['fp8_uncalibrated']['loss']:.3f} instead of {worst['fp8']['loss']:.3f}",
            f"{pct(x[c]['rel_rms_error'] for x in q for c in ('fp8', 'fp8_uncalibrated'))}% relative RMS error",
            f"{pct(x['fp8_uncalibrated']['below_min_normal'] for x in q)}% of the entries",
            f"under {max(100 * x['fp8']['below_min_normal'] for x in q):.2f}% with the calibrated scales"]


SPECULATIVE = "experiments/precision/results/speculative.json"
PIECES = {"forward": "main model forward", "forward_collect": "main model forward keeping each layer's input "
          "(verification)", "stateful_rerun": "Mamba layers re-run (rejection)",
          "mtp_depth": "one MTP depth and its LM head (drafting)"}


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def per_token(d, run: str, batch: str = "1") -> float:
    """Decode seconds per generated token of a timed run (median over repeats, prefill subtracted)."""
    b = d["throughput"]["batches"][batch]
    return median(b["runs"][run]["decode_seconds"]) / (b["prompts"] * (d["throughput"]["new_tokens"] - 1))


@table(SPECULATIVE + "#acceptance")
def speculative_acceptance_table(d):
    a = d["acceptance"]
    rows = [["draft length k", "acceptance rate", "tokens per step", "draft i kept when 1..i-1 were, i = 1..k",
             f"acceptance rate, batch {a['batch']}", f"acceptance rate, sampling at T = {a['temperature']:g}",
             "greedy outputs as plain"]]
    for k in map(str, a["draft_lengths"]):
        g, gb, s = (a[x][k] for x in ("greedy", "greedy_batch", "sampled"))
        rows.append([k, f"{g['acceptance_rate']:.3f}", f"{g['tokens_per_step']:.2f}",
                     " / ".join(f"{x:.2f}" for x in g["position_acceptance"]), f"{gb['acceptance_rate']:.3f}",
                     f"{s['acceptance_rate']:.3f}", f"{g['identical'] + gb['identical']} of {g['outputs'] + gb['outputs']}"])
    return rows


@table(SPECULATIVE + "#throughput")
def speculative_throughput_table(d):
    rows = [["batch", "decoding", "decode tokens/s, median (range)", "decode speedup, median (range)",
             "with the prefill", "verification steps", "outputs as plain"]]
    for batch, b in d["throughput"]["batches"].items():
        for name, r in b["runs"].items():
            tps, plain = r["decode_tokens_per_s"], name == "plain"
            rows.append([batch, "plain greedy" if plain else f"MTP, {name}",
                         f"{median(tps):.0f} ({min(tps):.0f}-{max(tps):.0f})",
                         "1" if plain else f"{median(r['speedup']):.2f}x ({span(r['speedup'])})",
                         "1" if plain else f"{median(r['end_to_end_speedup']):.2f}x",
                         "-" if plain else str(r["steps"]), "-" if plain else f"{r['identical']} of {r['outputs']}"])
    return rows


@table(SPECULATIVE + "#pieces")
def speculative_pieces_table(d):
    pieces = d["profile"]["pieces"]
    n = max(len(p) for p in pieces.values())
    rows = [["piece, microseconds at batch 1"] + [f"{m} token" + "s" * (m > 1) for m in range(1, n + 1)]]
    for key, name in PIECES.items():
        rows.append([name] + [us(pieces[key][str(m)]) if str(m) in pieces[key] else "-" for m in range(1, n + 1)])
    return rows


@table(SPECULATIVE + "#steps")
def speculative_steps_table(d):
    rows = [["k", "step, measured", "verification", "rollback", "drafting", "rest", "tokens per step",
             "per token", "per token, plain"]]
    for k, s in d["profile"]["steps"].items():
        rows.append([k, us(s["measured_step"]), us(s["verify"]), us(s["rollback"]), us(s["drafting"]), us(s["rest"]),
                     f"{d['acceptance']['greedy'][k]['tokens_per_step']:.2f}", us(per_token(d, f"k={k}")),
                     us(per_token(d, "plain"))])
    return rows


@prose(PRECISION, SPECULATIVE)
def speculative_prose(d):
    t, a, prof = d["train"], d["acceptance"], d["profile"]
    greedy, steps, pieces = a["greedy"], prof["steps"], prof["pieces"]
    b1 = d["throughput"]["batches"]["1"]["runs"]
    ks = [str(k) for k in a["draft_lengths"]]
    plain = per_token(d, "plain")
    speedups = [median(r["speedup"]) for b in d["throughput"]["batches"].values()
                for name, r in b["runs"].items() if name != "plain"]
    # the qualitative claims the text makes
    assert max(speedups) < 1  # slower than plain decoding at every draft length and batch
    assert all(g["identical"] == g["outputs"] for x in ("greedy", "greedy_batch") for g in a[x].values())
    assert all(r["identical"] == r["outputs"] for b in d["throughput"]["batches"].values()
               for name, r in b["runs"].items() if name != "plain")
    assert all(s["verify"] + s["rollback"] + s["drafting"] > greedy[k]["tokens_per_step"] * plain
               for k, s in steps.items())  # the pieces alone cost more than plain decoding of the same tokens
    assert all(0.4 < s["rest"] / s["measured_step"] < 0.6 for s in steps.values())  # "about half of every step"
    assert all(steps[k]["rollback"] < steps[k]["whole_model_rerun"] for k in ks)
    pos = [greedy["2"]["position_acceptance"][i] for i in (0, 1)]
    later = [x for k in ks for x in greedy[k]["position_acceptance"][2:]]
    assert all(0.4 < x < 0.6 for x in later)  # "about half the time"
    assert max(ks, key=lambda k: greedy[k]["tokens_per_step"]) == ks[-1]
    ratio = [steps[k]["verify"] / pieces["forward"]["1"] for k in ks]
    params = t["parameters"]
    load = d["environment"]["throughput"]["load_average"]
    return [f"{params['total'] / 1e6:.2f}M parameters) with two MTP depths",
            f"{params['mtp'] / 1e6:.2f}M parameters), trained for {t['recipe']['steps']} steps of "
            f"{t['recipe']['batch_size']} x {t['recipe']['seq_len']} bytes",
            f"{t['tokens'] / 1e6:.2f}M tokens) with MTP weight {t['recipe']['mtp_lambda']:g}",
            f"{t['seconds'] / 60:.0f} minutes on the shared 2-core machine",
            f"Held-out loss {t['eval_loss']:.3f} nats per byte, next-byte accuracy {100 * t['eval_accuracy']:.1f}%",
            f"{a['prompts']} held-out prompts (the first {a['prompt_len']} bytes of held-out windows) continued by "
            f"{a['new_tokens']} tokens",
            f"then {a['batch']} at a time, then sampled at temperature {a['temperature']:g}",
            f"{100 * pos[0]:.0f}% of the first drafts are kept, and given that, {100 * pos[1]:.0f}% of the second",
            "so the tokens per verification grow little beyond k = 2: "
            + ", ".join(f"{greedy[k]['tokens_per_step']:.2f}" for k in ks[1:-1]) + f" and "
            f"{greedy[ks[-1]]['tokens_per_step']:.2f} for k = " + ", ".join(ks[1:-1]) + f" and {ks[-1]}",
            f"at batch {a['batch']} the acceptance rate falls to {a['greedy_batch'][ks[0]]['acceptance_rate']:.3f} for "
            f"k = {ks[0]} and {a['greedy_batch'][ks[-1]]['acceptance_rate']:.3f} for k = {ks[-1]}",
            f"within each of {d['throughput']['repeats']} repeats",
            f"from {median(b1['k=' + ks[0]]['speedup']):.2f}x at k = {ks[0]} to "
            f"{median(b1['k=' + ks[-1]]['speedup']):.2f}x at k = {ks[-1]} (medians at batch 1)",
            f"(load average {span(load, lambda x: f'{x:.1f}')} during the timing",
            f"with {prof['position']} tokens in the cache",
            f"costs {span(ratio, lambda x: f'{x:.1f}')}x a one-token forward",
            f"({us(pieces['mtp_depth']['1'])} against {us(pieces['forward']['1'])} microseconds)",
            f"a step commits {greedy[ks[0]]['tokens_per_step']:.2f}-{greedy[ks[-1]]['tokens_per_step']:.2f} tokens, "
            f"while it costs {span([steps[k]['measured_step'] / plain for k in ks], lambda x: f'{x:.1f}')} plain "
            f"decoding steps",
            f"(expected {us(steps['2']['rollback'])} against {us(steps['2']['whole_model_rerun'])} microseconds per "
            f"step at k = 2, {us(steps[ks[-1]]['rollback'])} against {us(steps[ks[-1]]['whole_model_rerun'])} at "
            f"k = {ks[-1]})"]


# ------------------------------------------- the checks (below the renderers: parametrize reads the registries)
def test_every_table_with_numbers_names_its_source():
    unbacked = [f"{t.document}:{t.line} (section {t.section!r}): {' | '.join(t.rows[0])}"
                for t in ALL_TABLES if t.source is None and has_number(t)
                and not any(in_section(t, entry) for entry in PENDING_SOURCES)]
    assert not unbacked, "tables without a `<!-- source: ... -->` marker:\n" + "\n".join(unbacked)


def test_pending_sources_are_still_pending():
    stale = [entry for entry in PENDING_SOURCES
             if not any(t.source is None and has_number(t) and in_section(t, entry) for t in ALL_TABLES)]
    assert not stale, f"every table of these sections has its source: remove them from PENDING_SOURCES: {stale}"


def test_every_renderer_has_its_table():
    used = {t.source for t in ALL_TABLES}
    assert not set(TABLES) - used, f"renderers without a table: {sorted(set(TABLES) - used)}"
    for document, source in PROSE:
        assert document in DOCUMENTS and (ROOT / source.split("#")[0]).exists(), (document, source)


@pytest.mark.parametrize("t", [t for t in ALL_TABLES if t.source], ids=lambda t: f"{t.document}:{t.line}")
def test_table_matches_its_source(t):
    assert t.source in TABLES, f"{t.document}:{t.line} names {t.source!r}, which has no renderer in {__file__}"
    assert (ROOT / t.source.split("#")[0]).exists(), f"{t.document}:{t.line}: {t.source} does not exist"
    diffs = table_diffs(t)
    assert not diffs, f"{t.document}:{t.line} vs {t.source}:\n" + "\n".join(diffs)


def test_a_number_that_moved_is_caught():
    t = next(t for t in ALL_TABLES if t.source == MQAR)
    assert not table_diffs(t)
    moved = [row[:] for row in t.rows]
    moved[1][2] = "0.09 (0.03-0.14)"
    assert table_diffs(dataclasses.replace(t, rows=moved)) == [
        f"row 1: {'|'.join(moved[1])!r} != {'|'.join(t.rows[1])!r}"]
    assert table_diffs(dataclasses.replace(t, rows=t.rows[:-1]))  # a dropped row
    unmarked = dataclasses.replace(t, source=None)
    assert has_number(unmarked) and not any(in_section(unmarked, entry) for entry in PENDING_SOURCES)


def normalised(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("document,source", list(PROSE), ids=lambda x: x)
def test_prose_matches_its_source(document, source):
    text = normalised((ROOT / document).read_text())
    missing = [p for p in PROSE[(document, source)](load(source)) if normalised(p) not in text]
    assert not missing, f"{document} should state, from {source}:\n" + "\n".join(missing)
