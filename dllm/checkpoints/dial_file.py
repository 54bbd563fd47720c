"""An adapter's compute dial on disk: NAME.dial.json beside its checkpoint, the per-block margin
thresholds of each budget of a grid, or the budget a budget-conditioned adapter's routers are told
(router_inputs; a dial per phase: on the response tokens, prompt_router_inputs on the prompt's), calibrated by dllm/dial.py, with the adapter's checksum; and
NAME.lora_strength.json, the strength of its LoRA at each budget of a grid (dllm/dial.py, likewise)."""
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from dllm.atomic_io import atomic_write_text
from dllm.checkpoints import adapters
from dllm.core.routing import MarginDial
from dllm.errors import InputError

DIAL_SUFFIX = ".dial.json"
LORA_STRENGTH_SUFFIX = ".lora_strength.json"


def dial_path(adapter: str) -> str:
    """Where an adapter's dial lives: beside its checkpoint file, NAME.dial.json."""
    return os.path.splitext(adapters.adapter_file(adapter))[0] + DIAL_SUFFIX


def write_dial(dial: MarginDial, path: str, adapter_sha256: Optional[str], achieved: List[float], provenance: dict):
    routed = sorted({i for i in range(dial.thresholds.shape[1]) if dial.thresholds[:, i].any()})
    data = {**provenance, "adapter_sha256": adapter_sha256, "budgets": [round(b, 6) for b in dial.budgets.tolist()],
            "achieved_on_calibration": [round(a, 5) for a in achieved], "routed_blocks": routed,
            "thresholds": [[row[i] for i in routed] for row in dial.thresholds.tolist()]}
    for key, inputs in (("router_inputs", dial.inputs), ("prompt_router_inputs", dial.prompt_inputs)):
        if inputs is not None:
            data[key] = [round(v, 6) for v in inputs.tolist()]
    atomic_write_text(json.dumps(data, indent=1) + "\n", path)


def check_calibrated_for(adapter: str, data: dict, path: str, again: str):
    """A file calibrated beside an adapter belongs to this version of it (the checksum it recorded)."""
    own = adapters.read_adapter(adapter).get("adapter_sha256")
    if data.get("adapter_sha256") and own and data["adapter_sha256"] != own:
        raise InputError(f"{path}: calibrated for another version of {adapters.adapter_file(adapter)} (checksum "
                         f"differs); {again}")


def read_dial(adapter: str, n_layers: int) -> Optional[MarginDial]:
    """The dial beside an adapter, None if there is none; a dial of another version of the adapter
    (checksum) or a malformed file is refused in one line."""
    path = dial_path(adapter)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        budgets, rows, routed = data["budgets"], data["thresholds"], data["routed_blocks"]
        thresholds = torch.zeros(len(budgets), n_layers)
        for k, row in enumerate(rows):
            thresholds[k, routed] = torch.tensor(row, dtype=torch.float32)
        inputs, prompt_inputs = (read_inputs(data, key, len(budgets)) for key in ("router_inputs", "prompt_router_inputs"))
        if prompt_inputs is not None and inputs is None:
            raise ValueError("prompt_router_inputs without router_inputs")
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise InputError(f"{path}: not a valid dial ({e}); build it again with python -m tools.calibrate_dial") from None
    if len(budgets) != len(rows) or not budgets or any(b >= c for b, c in zip(budgets, budgets[1:])):
        raise InputError(f"{path}: budgets must increase, one row of thresholds each; build it again with "
                         f"python -m tools.calibrate_dial")
    check_calibrated_for(adapter, data, path, "build it again with python -m tools.calibrate_dial")
    return MarginDial(torch.tensor(budgets, dtype=torch.float32), thresholds, inputs, prompt_inputs)


def read_inputs(data: dict, key: str, n_budgets: int) -> Optional[torch.Tensor]:
    """A dial file's router inputs under `key` (None if absent): one budget in [0, 1] per grid budget."""
    inputs = data.get(key)
    if inputs is None:
        return None
    inputs = torch.tensor([float(v) for v in inputs], dtype=torch.float32)
    if len(inputs) != n_budgets or not bool(((inputs >= 0) & (inputs <= 1)).all()):
        raise ValueError(f"{key} must be {n_budgets} budgets in [0, 1], one per budget")
    return inputs


@dataclass
class LoraStrength:
    """The factor on a budget-conditioned adapter's LoRA update at each budget of an increasing grid;
    a budget between grid points takes the linear interpolation, one outside the grid its nearest end.
    A LoRA trained under every budget of a range moves the model even where nearly every block runs
    (docs/dial.md); its strength at high budgets is what this gives back."""

    budgets: List[float]
    strengths: List[float]

    def at(self, budget: float) -> float:
        return float(np.interp(budget, self.budgets, self.strengths))


def lora_strength_path(adapter: str) -> str:
    return os.path.splitext(adapters.adapter_file(adapter))[0] + LORA_STRENGTH_SUFFIX


def write_lora_strength(strength: LoraStrength, path: str, adapter_sha256: Optional[str], provenance: dict):
    data = {**provenance, "adapter_sha256": adapter_sha256, "budgets": strength.budgets,
            "strengths": strength.strengths}
    atomic_write_text(json.dumps(data, indent=1) + "\n", path)


def read_lora_strength(adapter: str) -> Optional[LoraStrength]:
    """The LoRA strength schedule beside an adapter, None if there is none; one of another version of
    the adapter (checksum) or a malformed file is refused in one line."""
    path = lora_strength_path(adapter)
    if not os.path.isfile(path):
        return None
    again = "build it again with python -m tools.calibrate_lora_strength"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        budgets, strengths = [float(b) for b in data["budgets"]], [float(v) for v in data["strengths"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a valid LoRA strength schedule ({e}); {again}") from None
    if len(budgets) != len(strengths) or not budgets or any(b >= c for b, c in zip(budgets, budgets[1:])):
        raise InputError(f"{path}: budgets must increase, one strength each; {again}")
    check_calibrated_for(adapter, data, path, again)
    return LoraStrength(budgets, strengths)
