"""Copy a fine-tuning run's final adapter into a directory to ship: the router and LoRA tensors only
(no optimizer state, so it stays small) with their checksum and the base's fingerprint (the one the
run recorded, else computed from --base for runs older than fingerprints), and the run's params.json,
log.jsonl and curves.png; and the calibrations beside the checkpoint (its dial, NAME.dial.json, and its
LoRA strengths, NAME.lora_strength.json), which name the adapter by its tensors' checksum and so stay
valid for the shipped copy: a budget-conditioned adapter ships with its `--budget` dial.

    python -m tools.ship_adapter output/smollm2-dllm assets/smollm2-dllm --base models/smollm2
"""
import os
import shutil

import fire

from dllm.checkpoints.adapters import adapter_file, base_fingerprint, read_adapter, write_adapter
from dllm.checkpoints.dial_file import dial_path, lora_strength_path
from dllm.errors import InputError, run_cli
from dllm.generation import Llama

COMPANIONS = ("params.json", "log.jsonl", "curves.png")


def main(run_dir: str, out_dir: str, checkpoint: str = "checkpoint-last.pth", base: str = None):
    source = adapter_file(os.path.join(run_dir, checkpoint))
    if not os.path.isfile(os.path.join(run_dir, "params.json")):
        raise InputError(f"{run_dir}: no params.json; is it a fine-tuning output directory?")
    ckpt = read_adapter(source)
    fingerprint = ckpt.get("base_fingerprint")
    if fingerprint is None and base:
        fingerprint = base_fingerprint(Llama.build(base, None, max_seq_len=8, model_parallel_size=1, dense=True).model)
    os.makedirs(out_dir, exist_ok=True)
    shipped = os.path.join(out_dir, "checkpoint.pth")
    write_adapter(shipped, ckpt["model"], fingerprint, epoch=ckpt.get("epoch"))
    for calibration in (dial_path, lora_strength_path):
        if os.path.isfile(calibration(source)):
            shutil.copy(calibration(source), calibration(shipped))
    for name in COMPANIONS:
        if os.path.isfile(os.path.join(run_dir, name)):
            shutil.copy(os.path.join(run_dir, name), os.path.join(out_dir, name))
    print(f"wrote {out_dir} from {source}")


if __name__ == "__main__":
    run_cli(fire.Fire, main)
