"""The named recipes (NAME.json: one section per entry point) and what this checkout's entry points
default to: the adapters shipped in assets/ and the datasets in datasets/. The library (dllm/)
knows none of these paths; the scripts at the top of the repository pass them."""
import json
import os

from dllm.config import Presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRECTORY = os.path.join(ROOT, "presets")
with open(os.path.join(DIRECTORY, "demo.json"), encoding="utf-8") as _demo:
    DEMO_BASE = os.path.join(ROOT, json.load(_demo)["finetuning"]["llama_ckpt_dir"])  # the demo preset's base
CHECKOUT_DEFAULTS = {"shipped_adapters": os.path.join(ROOT, "assets"), "dataset_path": os.path.join(ROOT, "datasets")}


def for_entry_point(section: str, default: str = None) -> Presets:
    """The presets of one entry point; `default` is used when the command line names no base model."""
    return Presets(DIRECTORY, section, default)
