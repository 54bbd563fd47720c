"""Shipped adapters: a directory with one adapter folder per base, found by the base's architecture."""
import glob
import os
import sys
from typing import Optional

from dllm.checkpoints.model_params import check_args_match, load_params
from dllm.errors import InputError, speaks


def shipped_adapter(base_dir: str, assets_dir: str) -> Optional[str]:
    """The checkpoint.pth of the first adapter directory, in name order, under `assets_dir` whose
    params.json describes this base's architecture, so a shipped adapter comes with its base and no
    other; a base with more than one (assets/smollm2, assets/smollm2-dllm) runs the first by default."""
    base = load_params(base_dir)
    for directory in sorted(glob.glob(os.path.join(assets_dir, "*"))):
        params, ckpt = os.path.join(directory, "params.json"), os.path.join(directory, "checkpoint.pth")
        if not (os.path.isfile(params) and os.path.isfile(ckpt)):
            continue
        try:
            check_args_match(load_params(params), base, params, base_dir)
        except InputError:
            continue
        return ckpt
    return None


def default_adapter(base_dir: str, assets_dir: str) -> Optional[str]:
    """The adapter shipped for this base, if any, said once on stderr (example.py and evaluate.py
    run it when no --dynamic_ckpt_dir is given)."""
    adapter = shipped_adapter(base_dir, assets_dir)
    if adapter and speaks():
        print(f"adapter: {adapter} (shipped for this base; --dense runs the base alone)", file=sys.stderr)
    return adapter
