"""A training run's folder (`mlsa4rec train --run-dir DIR`): what lets a run of many hours
go on after a stop.

DIR/state.pt   everything the next epoch depends on, rewritten atomically after every epoch:
               weights, optimiser, the best weights and their epoch, the early-stopping
               counter, the RNG states, the curve so far, and the TrainConfig, model overrides
               and data the run was started with (a resume under other settings is refused).
DIR/curve.csv  one row per epoch (model/curve.py), DIR/curve.png its plot.
DIR/model.pt   the final checkpoint of the best epoch (unless --checkpoint says elsewhere).

Saved with torch.save as plain containers, read back with weights_only=True, like
model/checkpoint.py: loading a state never runs code from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

STATE_FORMAT = 1
# Settings a resume may change: they do not alter what the next epoch computes (threads,
# progress bar, where the folder and the final checkpoint are), or only how long the run goes
# on. Changing `device` keeps the run going but not bit for bit (another RNG, other kernels).
MAY_CHANGE_ON_RESUME = ("epochs", "time_budget_min", "threads", "progress", "device",
                        "run_dir", "checkpoint")


class ResumeError(ValueError):
    """A run folder that cannot be continued (no state, unreadable, or other settings)."""


def state_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "state.pt"


def save_state(run_dir: str | os.PathLike, state: dict) -> None:
    """Atomic: a temp file, fsync, rename; a stop at any moment leaves the previous epoch's
    state or this one, never half of one."""
    path = state_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": STATE_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_state(run_dir: str | os.PathLike) -> dict:
    path = state_path(run_dir)
    if not path.exists():
        raise ResumeError(f"cannot resume: {path} does not exist (no epoch of a run with "
                          f"--run-dir {run_dir} has finished; start it without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file raises several kinds
        first_line = (str(exc).splitlines() or [""])[0]
        raise ResumeError(f"cannot resume: {path} is not a readable training state "
                          f"({exc.__class__.__name__}: {first_line})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"cannot resume: {path} is not a training state of format "
                          f"{STATE_FORMAT}")
    return state


def check_same_run(path: Path, stored: dict, given: dict) -> None:
    """stored / given: {"train_config": ..., "model_overrides": ..., "data": ...}. Names every
    field that differs, with both values."""
    changed = []
    for section in ("train_config", "model_overrides", "data"):
        old, new = stored.get(section, {}), given.get(section, {})
        for name in sorted(set(old) | set(new)):
            if section == "train_config" and name in MAY_CHANGE_ON_RESUME:
                continue
            if old.get(name, "<unset>") != new.get(name, "<unset>"):
                label = {"train_config": name, "model_overrides": f"--set {name}",
                         "data": f"data {name}"}[section]
                changed.append(f"{label}: {old.get(name, '<unset>')!r} -> "
                               f"{new.get(name, '<unset>')!r}")
    if changed:
        raise ResumeError(f"cannot resume {path}: it was started with other settings ("
                          + "; ".join(changed) + "). Give the same settings as the first "
                          "command, or start a new --run-dir")
