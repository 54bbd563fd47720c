"""The docs of the dllm test tasks, read from the JSON beside this file (the harness cannot download,
and a path in the YAML would depend on the working directory)."""
import json
import os

import datasets


def load(**_task_metadata) -> datasets.DatasetDict:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dllm_docs.json")) as f:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(json.load(f))})
