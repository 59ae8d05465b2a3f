"""Loads a bundled task's items (a JSONL file beside this one) for lm-eval's `custom_dataset`: the path
is taken relative to this directory, so the tasks run from any working directory and with no network."""
import json
import os

from datasets import Dataset, DatasetDict


def load(data_file, **_):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), data_file), encoding="utf-8") as f:
        return DatasetDict({"test": Dataset.from_list([json.loads(line) for line in f])})
