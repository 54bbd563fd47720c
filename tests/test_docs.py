"""The results pages and the README's results block are written from benchmarks/results by
`python -m tools.write_docs`; these tests fail when a results file changed without re-running it,
or when a generated page was edited by hand."""
import re
from pathlib import Path

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
