"""What a ``--resume`` changes: the new config against the checkpoint's ``config.yaml``, key by key.

A change that breaks the run the checkpoint belongs to — what is trained (recipe, method, network, margin,
classifier sampling), how (optimizer kind, precision, ZeRO stage) or on what, in which order (seed, dataset,
accumulation, loader and shuffling, augmentation) — is refused in one line naming the key and the
checkpoint's value, unless ``--resume-changes KEY`` accepts it (a key or any prefix of it: ``data.augment``).
Every other change (learning rate, schedule length, evaluation sets, logging, ...) is accepted; the trainer prints
each accepted change once and appends it to ``<output.dir>/resume_changes.jsonl``.
"""

from __future__ import annotations

from typing import Any

# Keys (and prefixes) whose change breaks the run a checkpoint belongs to. (data.batch_size is per rank: a resume
# on another world size changes it; the trainer checks the global batch itself and names what it must be.)
BREAKING = (
    "recipe",
    "method",
    "model",
    "margin",
    "classifier.sample_rate",
    "optim.name",
    "deepspeed.precision",
    "deepspeed.zero_stage",
    "deepspeed.grad_accum",
    "seed",
    "data.train",
    "data.num_workers",
    "data.shuffle_buffer",
    "data.loader",
    "data.augment",
    "plugins",
)
# Bookkeeping that differs between a run and its resume by design.
IGNORED = ("model.init_from", "model.initialised_from", "output.overwrite")
WHY = {
    "seed": "the data order and the per-step randomness are functions of the seed",
    "optim.name": "the optimizer state in the checkpoint belongs to the other optimizer",
    "data.train": "another dataset",
    "model": "another network",
}


def _under(key: str, prefixes: tuple[str, ...] | list[str]) -> str | None:
    for p in prefixes:
        if key == p or key.startswith(p + "."):
            return p
    return None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}; lists and scalars are leaves."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def compare(saved: dict, current: dict, accepted: list[str] = ()) -> tuple[dict, dict]:
    """(accepted changes, refused changes), each ``{key: (checkpoint's value, new value)}``; a key absent on one
    side (a config of an older release) is not a change."""
    old, new = flatten(saved), flatten(current)
    allowed, refused = {}, {}
    for key in sorted(set(old) & set(new)):
        if old[key] == new[key] or _under(key, IGNORED):
            continue
        if (
            isinstance(old[key], (int, float))
            and isinstance(new[key], (int, float))
            and float(old[key]) == float(new[key])
        ):
            continue
        if _under(key, BREAKING) and not _under(key, accepted):
            refused[key] = (old[key], new[key])
        else:
            allowed[key] = (old[key], new[key])
    return allowed, refused


def refusal(checkpoint: str, refused: dict) -> str:
    """The one-line error for the first refused change (and how many more)."""
    key, (was, now) = next(iter(refused.items()))
    group = _under(key, tuple(WHY))
    why = f" ({WHY[group]})" if group else ""
    more = f"; {len(refused) - 1} more: {', '.join(list(refused)[1:4])}" if len(refused) > 1 else ""
    return (
        f"--resume: {key} is {_shown(now)} but checkpoint {checkpoint} was trained with {_shown(was)}{why}{more}. "
        f"Resume with {key}={_shown(was)}, start a new run, or accept the change with --resume-changes {key}"
    )


def _shown(value: Any) -> str:
    return value if isinstance(value, str) and value else repr(value)
