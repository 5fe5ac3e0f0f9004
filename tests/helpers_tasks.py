"""An lm-eval task defined in the tests themselves: a YAML over a JSONL file, both written to a folder.

Multiple choice, one sentence and three endings each; lines short enough (< 100 characters) for the tiny
models' 128-position context with the character tokenizer. The data file's path in the YAML is absolute
(lm-eval's `json` datasets read `data_files` as given, relative to the working directory otherwise).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

TASK = "secateurs_facts"

# (sentence, endings, index of the right one)
FACTS = [
    ("The capital of France is", ["Paris", "Madrid", "Tokyo"], 0),
    ("The capital of Japan is", ["Berlin", "Tokyo", "Cairo"], 1),
    ("The capital of Italy is", ["Oslo", "Lima", "Rome"], 2),
    ("Water freezes at zero degrees", ["Celsius", "pounds", "metres"], 0),
    ("The sun rises in the", ["north", "east", "basement"], 1),
    ("A week has seven", ["planets", "oceans", "days"], 2),
    ("Cows drink", ["water", "petrol", "ink"], 0),
    ("The opposite of hot is", ["loud", "cold", "blue"], 1),
    ("Two plus two equals", ["seven", "ten", "four"], 2),
    ("Birds can", ["fly", "read", "vote"], 0),
    ("The largest ocean on Earth is the", ["Arctic", "Pacific", "Baltic"], 1),
    ("Bread is baked in an", ["igloo", "envelope", "oven"], 2),
    ("The colour of grass is", ["green", "purple", "black"], 0),
    ("Ice is frozen", ["sand", "water", "wood"], 1),
    ("People sleep in a", ["teapot", "violin", "bed"], 2),
    ("The first month of the year is", ["January", "October", "Friday"], 0),
    ("Fish live in", ["deserts", "water", "clouds"], 1),
    ("A triangle has three", ["wheels", "moons", "sides"], 2),
    ("The Earth orbits the", ["Sun", "Moon", "comet"], 0),
    ("Snow is usually", ["red", "white", "orange"], 1),
    ("Shakespeare wrote", ["symphonies", "software", "plays"], 2),
    ("A doctor works in a", ["hospital", "volcano", "submarine"], 0),
    ("The chemical symbol for water is", ["NaCl", "H2O", "CO2"], 1),
    ("Cats say", ["quack", "moo", "meow"], 2),
]


def write_task(folder: Path, name: str = TASK, facts=FACTS, dataset_path: str = "json") -> Path:
    """`folder/NAME.yaml` and `folder/NAME.jsonl`; returns the folder (what --include-path takes).

    `dataset_path`: another value (a hub id) makes a task whose data must come from the hub."""
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps({"q": q, "endings": e, "label": a}) + "\n" for q, e, a in facts))
    source = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        if dataset_path == "json"
        else f"dataset_path: {dataset_path}\n"
    )
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n{source}test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


@torch.inference_mode()
def by_hand(model, tok, facts) -> dict[str, float]:
    """lm-eval's multiple choice, worked out directly: each ending's summed log-probability after the
    sentence and a space (the task's target delimiter); `acc` takes the largest, `acc_norm` the largest
    per character of the ending; the stderr is the sample standard deviation over sqrt(n)."""
    hits, hits_norm = [], []
    for sentence, endings, answer in facts:
        context = tok(sentence, add_special_tokens=False)["input_ids"]
        scores = []
        for ending in endings:
            whole = tok(f"{sentence} {ending}", add_special_tokens=False)["input_ids"]
            logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(context), len(whole))))
        best = max(range(len(endings)), key=lambda i: scores[i])
        best_norm = max(range(len(endings)), key=lambda i: scores[i] / len(endings[i]))
        hits.append(float(best == answer))
        hits_norm.append(float(best_norm == answer))

    def stderr(x):
        mean = sum(x) / len(x)
        return math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1) / len(x))

    return {
        "acc": sum(hits) / len(hits),
        "acc_stderr": stderr(hits),
        "acc_norm": sum(hits_norm) / len(hits_norm),
        "acc_norm_stderr": stderr(hits_norm),
    }
