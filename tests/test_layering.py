"""The package's layers, enforced: the algorithm (dllm/core) imports torch and fairscale only and
does no I/O; checkpoints and training sit on it; the apps (generation, evaluation, pictures) on
top; nothing in dllm/ knows this checkout's scripts, presets, tools or benchmarks."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "dllm")
INFRA = {"dllm.errors", "dllm.atomic_io", "dllm.config", "dllm.distributed", "dllm.launch", "dllm.tokenizer",
         "dllm.chat", "dllm.data", "dllm.host_memory"}
# what each layer may import from dllm (a prefix allows the subpackage)
ALLOWED = {
    "dllm.core": ("dllm.core", "dllm.errors"),
    "dllm.checkpoints": ("dllm.core", "dllm.checkpoints", "dllm.errors", "dllm.atomic_io", "dllm.distributed"),
    "dllm.training": ("dllm.core", "dllm.checkpoints", "dllm.training", *INFRA, "dllm.plots", "dllm.token_view"),
    **{name: tuple(INFRA) for name in INFRA},
    # its lazy exports, by name, and the malloc setting that must precede torch
    "dllm": ("dllm.core.model", "dllm.generation", "dllm.tokenizer", "dllm.host_memory"),
    "dllm.plots": (*INFRA, "dllm.core", "dllm.token_view", "dllm.curves"),
    "dllm.curves": (),  # plain arithmetic on results, below the pictures and the benchmarks
    "dllm.token_view": (*INFRA, "dllm.core"),
}
# the algorithm does no I/O: no files, flags, processes or printing
CORE_FORBIDDEN_MODULES = {"os", "sys", "argparse", "subprocess", "glob", "json", "pathlib", "shutil", "tqdm"}


def modules():
    for folder, _, files in os.walk(PACKAGE):
        for file in sorted(files):
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                yield name, path


def imports(path: str) -> set:
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "dllm" or node.module.startswith("dllm."):  # `from dllm.core import model`
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def layer(name: str) -> str:
    for prefix in ("dllm.core", "dllm.checkpoints", "dllm.training"):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return name


def existing(name: str) -> bool:
    base = os.path.join(ROOT, *name.split("."))
    return os.path.isfile(base + ".py") or os.path.isdir(base)


@pytest.mark.parametrize("name, path", list(modules()), ids=[name for name, _ in modules()])
def test_each_module_imports_only_from_its_own_layer_and_below(name, path):
    allowed = ALLOWED.get(layer(name))
    own = {i for i in imports(path) if (i == "dllm" or i.startswith("dllm.")) and existing(i)}
    if allowed is not None:
        bad = sorted(i for i in own if i != "dllm" and not any(i == a or i.startswith(a + ".") for a in allowed))
        assert not bad, f"{name} imports {bad}; its layer may import {sorted(allowed)}"
    outside = sorted(i for i in imports(path) if i.split(".")[0] in {"presets", "tools", "benchmarks", "finetuning",
                                                                     "example", "evaluate", "tests", "conftest"})
    assert not outside, f"{name} imports this checkout's {outside}"


@pytest.mark.parametrize("name, path", [(n, p) for n, p in modules() if layer(n) == "dllm.core"],
                         ids=[n for n, _ in modules() if layer(n) == "dllm.core"])
def test_the_core_does_no_io(name, path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    assert not imports(path) & CORE_FORBIDDEN_MODULES, f"{name} imports {sorted(imports(path) & CORE_FORBIDDEN_MODULES)}"
    calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert "print" not in calls and "open" not in calls


@pytest.mark.slow
def test_the_core_imports_with_torch_and_fairscale_alone():
    """In a fresh interpreter where every other third-party package fails to import."""
    blocked = ["sentencepiece", "tokenizers", "safetensors", "jinja2", "gguf", "tqdm", "matplotlib", "rouge_score",
               "transformers", "lm_eval"]
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        f"    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}: raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dllm.core.model, dllm.core.objective, dllm.core.flops, dllm.core.kv_cache, dllm.core.routing\n"
        "from dllm import Transformer\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_no_import_cycles():
    graph = {name: {i for i in imports(path) if i.startswith("dllm.") and existing(i)} for name, path in modules()}
    names = set(graph)

    def resolve(i):  # `dllm.checkpoints.adapters` is a module; `dllm.core` a package's __init__
        return i if i in names else None

    done, active = set(), []

    def visit(node):
        if node in active:
            raise AssertionError(" -> ".join(active[active.index(node):] + [node]))
        if node in done:
            return
        active.append(node)
        for target in filter(None, map(resolve, graph.get(node, ()))):
            visit(target)
        active.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
