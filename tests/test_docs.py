"""The results pages and the README's results block are written from benchmarks/results by
`python -m tools.write_docs`; these tests fail when a results file changed without re-running it,
or when a generated page was edited by hand."""
import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest

from dllm.config import Settings, parser_for
from tools import write_docs

ROOT = Path(__file__).resolve().parent.parent


def test_generated_docs_match_their_templates():
    stale = [str(path.relative_to(ROOT)) for path, text in write_docs.render_all().items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"out of date, run `python -m tools.write_docs`: {', '.join(stale)}"


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_relative_links_point_at_files():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and "://" not in path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def test_a_changed_result_makes_the_page_stale():
    """The check can fail: a results file that changes changes the page written from it."""
    results = write_docs.load_results()
    results["dial_demo"]["rows"][0]["val_ce"] += 1.0
    env = write_docs.environment()
    env.globals["results"] = results
    assert env.get_template("dial.md").render() != write_docs.environment().get_template("dial.md").render()


def _documented_commands():
    """Every `python -m benchmarks.NAME ...` / `python -m tools.NAME ...` the README and the pages show."""
    pattern = re.compile(r"python -m ((?:benchmarks|tools)\.\w+)((?: (?:'[^']*'|\"[^\"]*\"|\[[^\]`]*\]|[^\s`'\"]+))*)")
    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    found = {(m.group(1), m.group(2).strip()) for text in texts for m in pattern.finditer(text.replace("\\\n", " "))}
    # fire's tools and the harness's command line have no parser of their own to ask
    own_parser = {path.stem for folder in ("benchmarks", "tools") for path in (ROOT / folder).glob("*.py")
                  if re.search(r"^def parse_args|Config\.parse\(", path.read_text(), re.M)}
    return sorted((module, args) for module, args in found if args and module.split(".")[1] in own_parser)


@pytest.mark.slow  # imports every benchmark, some of which need the benchmark extras
@pytest.mark.parametrize("module, args", _documented_commands())
def test_every_documented_benchmark_command_parses_today(module, args):
    """A command the docs show (as-run commands are shown in today's spelling) is accepted by its script."""
    script = importlib.import_module(module)
    argv = shlex.split(args)
    if hasattr(script, "parse_args"):
        script.parse_args(argv)
        return
    configs = [c for c in vars(script).values() if isinstance(c, type) and issubclass(c, Settings) and c is not Settings]
    own = [c for c in configs if c.__module__ == script.__name__] or configs
    leaves = [c for c in own if not any(other is not c and issubclass(other, c) for other in own)]
    assert len(leaves) == 1, f"{module}: settings classes {leaves}"
    required = {f.name: "x" for f in dataclasses.fields(leaves[0]) if f.metadata.get("required")}
    parser_for(leaves[0], defaults=required).parse_args(argv)  # the flags exist and their values convert


def test_a_quote_inside_a_recorded_word_reads_as_double_quotes_and_parses_the_same():
    recorded = shlex.join(["python", "-m", "benchmarks.baselines", "--recipe", "EPOCHS=1 ROUTER_BIAS='0 4'",
                           "--separate", '["0.55=runs/a"]'])
    shown = write_docs.current_command(recorded)
    assert "--recipe \"EPOCHS=1 ROUTER_BIAS='0 4'\"" in shown
    assert shlex.split(shown) == shlex.split(recorded)


def test_seed_verdicts_read_every_seed_off_the_static_curve():
    def row(label, x, kl):
        return {"label": label, "point": label.rsplit("-s", 1)[0], "flops_generation": x, "kl": kl}

    static = [row("static:a-s0", 0.8, 0.8), row("static:a-s1", 0.8, 0.6), row("static:b-s0", 1.0, 0.2)]
    recipes = [("ahead", [row("d:1-s0", 0.9, 0.3), row("d:1-s1", 0.9, 0.4)]),
               ("mixed", [row("d:2-s0", 0.9, 0.3), row("d:2-s1", 0.9, 0.5), row("d:3-s0", 0.9, 0.0)]),
               ("outside", [row("d:4-s0", 0.9, 0.3), row("d:4-s1", 0.7, 0.3)])]
    verdicts = write_docs.seed_verdicts(static, recipes, "flops_generation")
    # static's seed mean at 0.8 is 0.7, so at 0.9 its curve reads 0.45; d:3 has one seed and is left out
    assert [(v["recipe"], v["point"], v["verdict"]) for v in verdicts] == [
        ("ahead", "d:1", "ahead in every seed"), ("mixed", "d:2", "seeds disagree"),
        ("outside", "d:4", "outside static's curve")]
    assert verdicts[0]["diffs"] == pytest.approx([-0.15, -0.05])


def test_overlaid_rows_and_the_least_curve_at_equal_x():
    """overlaid replaces a row by the re-measured one at its budget and keeps the rest in order;
    least_at is the lower of the curves where any covers x, None where none does."""
    rows = [{"budget": 0.5, "kl": 3.0}, {"budget": 0.75, "kl": 1.0}]
    again = [{"budget": 0.5, "kl": 2.5}]
    assert write_docs.overlaid(rows, again) == [again[0], rows[1]]
    low, high = [(0.6, 2.0), (0.8, 1.0)], [(0.5, 4.0), (0.7, 2.0)]
    assert write_docs.least_at([low, high], 0.7) == pytest.approx(1.5)
    assert write_docs.least_at([low, high], 0.55) == pytest.approx(3.5)
    assert write_docs.least_at([low, high], 0.9) is None
