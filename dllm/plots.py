"""PNG pictures of what a run did: training curves from log.jsonl, quality against FLOPs ratio from
several results.json, and the token x block routing grid of a generation.

Figures are built without pyplot (no global state, no display needed); the functions that build
them return the Figure so its drawn data can be checked.
"""
import io
import json
import os
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dllm.atomic_io import atomic_write_bytes
from dllm.curves import curve_points, method_of
from dllm.errors import InputError
from dllm.token_view import KIND_COLORS, KIND_NAMES, SequenceRouting


def save_png(fig: Figure, path: str):
    """Drawn in memory, then written whole, like every other output file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(buffer.getvalue(), path)


# ------------------------------------------------------------------ training curves


def read_log(path: str) -> Tuple[List[dict], List[dict]]:
    """(step lines, epoch lines) of a log.jsonl, sorted; a resumed run appends, so a later line for
    the same step or epoch replaces the earlier one."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such log")
    steps, epochs = {}, {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}:{number}: not a JSON line") from None
            if "step" in record:
                steps[record["step"]] = record
            elif "val_c_loss" in record:
                epochs[record["epoch"]] = record
    return [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)]


def epoch_end_steps(steps: List[dict], epochs: List[dict]) -> List[float]:
    """The x of each validation point: the last logged step of its epoch."""
    last = {}
    for s in steps:
        last[s["epoch"]] = s["step"]
    return [last.get(e["epoch"], float("nan")) for e in epochs]


def curves_figure(steps: List[dict], epochs: List[dict], target: float) -> Figure:
    """Train CE, execution ratio against its target, lambda and lr over steps; validation per epoch."""
    fig = Figure(figsize=(10, 6.5))
    (ce, ratio), (lam, lr) = fig.subplots(2, 2, sharex=True)
    x = [s["step"] for s in steps]
    val_x = epoch_end_steps(steps, epochs)
    ce.plot(x, [s["c_loss"] for s in steps], label="train CE", color="C0", lw=1)
    ce.plot(val_x, [e["val_c_loss"] for e in epochs], "o", label="validation CE", color="C3")
    ce.set_ylabel("cross-entropy")
    ratio.plot(x, [s["act_ratio"] for s in steps], label="train", color="C0", lw=1)
    ratio.plot(val_x, [e["val_act_ratio"] for e in epochs], "o", label="validation", color="C3")
    ratio.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
    ratio.set_ylabel("share of blocks executed")
    lam.plot(x, [s["lambda"] for s in steps], color="C2")
    lam.set_ylabel("lambda (rate-loss weight)")
    lr.plot(x, [s["lr"] for s in steps], color="C1")
    lr.set_ylabel("learning rate")
    for ax in (ce, ratio):
        ax.legend(fontsize=8)
    for ax in (lam, lr):
        ax.set_xlabel("step")
    for ax in (ce, ratio, lam, lr):
        ax.grid(alpha=0.3)
    fig.suptitle("D-LLM fine-tuning")
    fig.tight_layout()
    return fig


def run_target(output_dir: str) -> float:
    """The execution-ratio target the run was trained for, from the params.json it wrote."""
    path = os.path.join(output_dir, "params.json")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (the run's model args, with dynamic_active_target)")
    with open(path) as f:
        return json.load(f)["dynamic_active_target"]


def write_curves(output_dir: str, out_path: Optional[str] = None) -> str:
    """curves.png (or `out_path`) from a run directory's log.jsonl and params.json."""
    steps, epochs = read_log(os.path.join(output_dir, "log.jsonl"))
    if not steps:
        raise InputError(f"{output_dir}/log.jsonl: no step lines yet")
    out_path = out_path or os.path.join(output_dir, "curves.png")
    save_png(curves_figure(steps, epochs, run_target(output_dir)), out_path)
    return out_path


def write_curves_or_warn(output_dir: str, warn: Callable[[str], None]):
    """For the training loop: a picture that cannot be drawn is reported, never allowed to end a run."""
    try:
        write_curves(output_dir)
    except Exception as e:  # noqa: BLE001 -- any failure here must leave training running
        warn(f"curves.png not written: {type(e).__name__}: {e}")


# ------------------------------------------------------------------ quality versus FLOPs


def quality_points(runs: List[Tuple[str, List[dict]]]) -> Dict[Tuple[str, str], Dict[str, List[Tuple[float, float]]]]:
    """{(dataset, metric): {method: [(flops ratio, value)] sorted by FLOPs ratio}}, methods in first-seen order."""
    panels = defaultdict(dict)
    for method, rows in runs:
        for r in rows:
            panels[(r["dataset"], r["metric"])].setdefault(method, []).append((r["flops_ratio"], r["value"]))
    return {key: {m: sorted(points) for m, points in methods.items()} for key, methods in panels.items()}


def quality_flops_figure(runs: List[Tuple[str, List[dict]]]) -> Figure:
    """One panel per (dataset, metric), one line per method through its runs."""
    panels = quality_points(runs)
    if not panels:
        raise InputError("the results files hold no rows")
    fig = Figure(figsize=(4.2 * min(3, len(panels)), 3.4 * ((len(panels) + 2) // 3)))
    axes = fig.subplots((len(panels) + 2) // 3, min(3, len(panels)), squeeze=False).ravel()
    for ax, ((dataset, metric), methods) in zip(axes, panels.items()):
        for method, points in methods.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=method)
        ax.set_title(f"{dataset}: {metric}" + (" (lower is better)" if metric == "ppl" else ""), fontsize=10)
        ax.set_xlabel("FLOPs ratio (vs dense)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ what is kept of the base


FIDELITY_PANELS = (("kl", "KL(base || model) per response token (lower is better)"),
                   ("gen_first_words", "greedy answers: first 10 words equal the base's"),
                   ("gen_rouge_l", "greedy answers: ROUGE-L F1 against the base's"))


def fidelity_figure(runs: Dict[str, dict], x_key: str = "flops_generation") -> Figure:
    """benchmarks/fidelity.py's runs against their FLOPs ratio in generation: one line per method
    (the label before ':'), through its points in FLOPs order; a point run with several seeds is
    their mean, its bar their range."""
    if not runs:
        raise InputError("no runs to draw")
    methods = list(dict.fromkeys(method_of(label) for label in runs))
    fig = Figure(figsize=(4.4 * len(FIDELITY_PANELS), 3.6))
    for ax, (key, title) in zip(fig.subplots(1, len(FIDELITY_PANELS), squeeze=False).ravel(), FIDELITY_PANELS):
        for method in methods:
            points = curve_points(runs, method, x_key, key)
            ax.errorbar([p.x for p in points], [p.y for p in points], fmt="o-", capsize=3, label=method,
                        yerr=[[p.y - p.low for p in points], [p.high - p.y for p in points]])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("FLOPs ratio in generation (vs dense)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ routing grid


def routing_grid_figure(sequences: List[SequenceRouting]) -> Figure:
    """Per sequence, blocks down and tokens across, coloured by cell kind; a line where generation starts."""
    width = max(len(s.pieces) for s in sequences)
    n_layers = len(sequences[0].kinds[0])
    fig = Figure(figsize=(max(6.0, 0.13 * width + 1.5), (0.22 * n_layers + 1.6) * len(sequences) + 0.4))
    axes = fig.subplots(len(sequences), 1, squeeze=False).ravel()
    cmap = ListedColormap(KIND_COLORS)
    for ax, seq in zip(axes, sequences):
        grid = [[row[block] for row in seq.kinds] for block in range(n_layers)]
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(KIND_COLORS) - 0.5, aspect="auto", interpolation="nearest")
        ax.axvline(seq.n_prompt - 0.5, color="#e6550d", lw=1.5)
        ax.set_xticks(range(len(seq.pieces)))
        ax.set_xticklabels([p.replace("\n", "\\n") for p in seq.pieces], rotation=90, fontsize=6, family="monospace")
        ax.set_yticks(range(n_layers))
        ax.set_yticklabels(range(n_layers), fontsize=7)
        ax.set_ylabel("block")
        ax.set_title(
            f"executed {100 * seq.exec_ratio:.1f}% | KV kept {100 * seq.kv_ratio:.1f}% | "
            f"FLOPs {100 * seq.flops_ratio:.1f}% of dense (orange line: generation starts)", fontsize=9,
        )
    fig.legend(handles=[Patch(color=c, label=n) for c, n in zip(KIND_COLORS, KIND_NAMES)],
               loc="lower center", ncol=len(KIND_NAMES), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


# ------------------------------------------------------------------ cost as the work grows


def scaling_figure(result: dict) -> Figure:
    """benchmarks/bench_scaling.py's cells: per batch, decode and prefill ms per token against
    context, one line per configuration; K/V memory per row and decode speed over dense beside."""
    cells = [c for c in result["cells"] if "configs" in c]
    if not cells:
        raise InputError("the scaling results hold no measured cells")
    names = list(cells[0]["configs"])
    batches = sorted({c["batch"] for c in cells})
    fig = Figure(figsize=(4.0 * (len(batches) + 1), 7.0))
    axes = fig.subplots(2, len(batches) + 1, squeeze=False)

    def line(ax, batch, name, key):
        points = [(c["context"], c["configs"][name][key]) for c in cells
                  if c["batch"] == batch and key in c["configs"][name]]
        if points:
            ax.plot(*zip(*points), "o-", ms=3, label=name, color=f"C{names.index(name)}")

    for col, batch in enumerate(batches):
        for row, (key, what) in enumerate((("decode_ms_per_token", "decode"), ("prefill_ms_per_token", "prefill"))):
            ax = axes[row][col]
            for name in names:
                line(ax, batch, name, key)
            ax.set_title(f"{what}, batch {batch}", fontsize=10)
            ax.set_ylabel("ms per token")
    kv, speed = axes[0][-1], axes[1][-1]
    for name in names:
        line(kv, batches[0], name, "kv_mb_per_row")
        for style, batch in zip(("-", "--", ":"), batches):
            points = [(c["context"], c["configs"][name]["decode_x_dense"]) for c in cells if c["batch"] == batch]
            if name.startswith("dllm") and points:
                speed.plot(*zip(*points), style, marker="o", ms=3, color=f"C{names.index(name)}",
                           label=f"{name}, batch {batch}")
    kv.set_title("K/V memory per row (transformers: its static cache)", fontsize=10)
    kv.set_ylabel("MB")
    speed.axhline(1, color="k", lw=1)
    speed.set_title("decode speed over dense", fontsize=10)
    speed.set_ylabel("x dense")
    for ax in axes.ravel():
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens per row)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    speed.legend(fontsize=6)
    meta = result["meta"]
    fig.suptitle(f"{meta['model']}: dim {meta['dim']}, {meta['n_layers']} layers, {meta['device']}", fontsize=11)
    fig.tight_layout()
    return fig
