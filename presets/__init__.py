"""The named recipes (NAME.json: one section per entry point) and what this checkout's entry points
default to: the adapters shipped in assets/ and the datasets in datasets/. The library (dllm/)
knows none of these paths; the scripts at the top of the repository pass them."""
import os

from dllm.config import Presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRECTORY = os.path.join(ROOT, "presets")
CHECKOUT_DEFAULTS = {"shipped_adapters": os.path.join(ROOT, "assets"), "dataset_path": os.path.join(ROOT, "datasets")}


def for_entry_point(section: str, default: str = None) -> Presets:
    """The presets of one entry point; `default` is used when the command line names no base model."""
    return Presets(DIRECTORY, section, default)
