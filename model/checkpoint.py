"""Checkpoints: weights, model name and config, item-id map, metrics and a version id.

Saved with torch.save as plain containers (tensors, str, numbers, lists, dicts) so that they
load with torch.load(weights_only=True): loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from pathlib import Path

import torch

from model.models import build_model


def new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def save_checkpoint(path: str | os.PathLike, model, item_ids: list[str], metrics: dict,
                    version: str | None = None, extra: dict | None = None) -> str:
    """Writes atomically (temp file, fsync, rename); returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": 1,
        "version": version or new_version(),
        "model": model.name,
        "config": model.describe(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "item_ids": list(item_ids),
        "metrics": metrics,
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())      # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(path: str | os.PathLike, device="cpu", expected_sha256: str | None = None):
    """Returns (model in eval mode, payload). Refuses a file whose sha256 differs."""
    return load_checkpoint_bytes(Path(path).read_bytes(), device, expected_sha256, str(path))


def load_checkpoint_bytes(data: bytes, device="cpu", expected_sha256: str | None = None,
                          name: str = "checkpoint"):
    """The same from the file's bytes (a model store on any fsspec filesystem)."""
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ValueError(f"{name}: sha256 {actual} != expected {expected_sha256}")
    try:
        payload = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != 1:
            raise ValueError("not a checkpoint of format 1")
        config = {k: v for k, v in payload["config"].items() if k not in ("model", "n_items")}
        # A model that grew its vocabulary online keeps spare embedding rows past the id map.
        n_items = payload["config"].get("n_items", len(payload["item_ids"]))
        model = build_model(payload["model"], n_items, config)
        model.load_state_dict(payload["state_dict"])
    except Exception as exc:  # noqa: BLE001 - torch and a bad payload raise several kinds
        first_line = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"{name}: unreadable checkpoint ({exc.__class__.__name__}: "
                         f"{first_line})") from None
    model.n_known = len(payload["item_ids"])
    return model.to(device).eval(), payload


def checkpoint_data(payload: dict, dataset: str = ""):
    """The data a checkpoint's run trained on (its dataset, or `dataset`, under the run's own
    filters), checked to hold the checkpoint's item set."""
    from model.data.protocol import prepare_for_run

    run = payload["metrics"].get("train_config")
    if run is None:
        raise ValueError("no offline training run is recorded in it (a version published by "
                         "the online trainer?), so its data and item map cannot be rebuilt")
    dataset = dataset or run["dataset"]
    data = prepare_for_run({**run, "dataset": dataset})
    if data.item_ids != payload["item_ids"]:
        raise ValueError(f"the checkpoint was trained on another item set than {dataset}")
    return data
