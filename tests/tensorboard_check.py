"""Reads a trainer run's TensorBoard event files with TensorBoard's own reader and checks them
against the run's metrics.jsonl: every logged step's train/loss and train/learning_rate, every
evaluation's eval/loss (float32 equality). Usage: python3 tests/tensorboard_check.py RUN_DIR.
Needs the `tensorboard` package (the GPU machine's image has it; `pip install tensorboard` here)."""
import json
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run = sys.argv[1]
acc = EventAccumulator(run, size_guidance={"scalars": 0})
acc.Reload()
tags = acc.Tags()["scalars"]
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.strip()]
checked = 0
for key, tag in [("loss", "train/loss"), ("lr", "train/learning_rate"), ("eval_loss", "eval/loss")]:
    want = {r["step"]: r[key] for r in rows if key in r}
    if not want:
        continue
    assert tag in tags, f"{tag} missing; tags: {tags}"
    got = {e.step: e.value for e in acc.Scalars(tag)}
    assert sorted(got) == sorted(want), f"{tag}: steps {sorted(got)} vs metrics.jsonl {sorted(want)}"
    for step, v in want.items():
        assert math.isclose(got[step], v, rel_tol=1e-6, abs_tol=1e-12), f"{tag} at step {step}: {got[step]} vs {v}"
        checked += 1
print(f"tensorboard reads {checked} values under {len(tags)} tags, equal to metrics.jsonl")
