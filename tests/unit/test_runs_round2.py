"""Runs that survive, round 2 (issue 22): one run per folder (a lock that names its holder), resumes that name what
changed, config ranges with the types.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_runs_round2.py.
"""

from __future__ import annotations

from pipeline import resume_changes

# --------------------------------------------------------------------------- 2. one run per folder


def test_resume_compare_classifies_every_key():
    saved = {"seed": 0, "optim": {"name": "sgd", "lr": 0.1}, "schedule": {"epochs": 20}, "model": {"init_from": "a"},
             "data": {"val": ["a.bin"], "augment": {"flip": 0.5}}}  # fmt: skip
    new = {"seed": 5, "optim": {"name": "adamw", "lr": 0.05}, "schedule": {"epochs": 30.0}, "model": {"init_from": ""},
           "data": {"val": ["b.bin"], "augment": {"flip": 0.0}}}  # fmt: skip
    accepted, refused = resume_changes.compare(saved, new)
    assert set(refused) == {"seed", "optim.name", "data.augment.flip"}
    assert accepted == {"optim.lr": (0.1, 0.05), "schedule.epochs": (20, 30.0), "data.val": (["a.bin"], ["b.bin"])}
    accepted, refused = resume_changes.compare(saved, new, ["seed", "data.augment"])
    assert set(refused) == {"optim.name"} and {"seed", "data.augment.flip"} <= set(accepted)
    line = resume_changes.refusal("ckpt/step_4", {"seed": (0, 5)})
    assert "\n" not in line and line.startswith("--resume: seed is 5 but checkpoint ckpt/step_4 was trained with 0")
    assert "data order" in line and "--resume-changes seed" in line
