"""Model versions on disk, and what a version announcement says.

A version = one checkpoint file (weights, config, item-id map, metrics; model/checkpoint.py)
written atomically into the store directory, and an announcement:
    {"version", "path" (relative to the store), "sha256", "created_at" (ms), "parent",
     "trained_through" (ms timestamp of the newest event it trained on, or null)}
A reader loads a version only from inside its own store and only after the sha256 matches.
"""

from __future__ import annotations

import time
from pathlib import Path

from model.checkpoint import load_checkpoint, new_version, save_checkpoint


class ModelStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def publish(self, model, item_ids: list[str], metrics: dict, parent: str | None,
                trained_through: int | None = None, version: str | None = None) -> dict:
        version = version or new_version()
        path = self.root / f"{version}.pt"
        sha = save_checkpoint(path, model, item_ids, metrics, version=version,
                              extra={"parent": parent})
        return {"version": version, "path": path.name, "sha256": sha,
                "created_at": int(time.time() * 1000), "parent": parent,
                "trained_through": trained_through}

    def resolve(self, path: str) -> Path:
        """The file an announcement names; refuses anything outside the store."""
        resolved = (self.root / path).resolve()
        if not resolved.is_relative_to(self.root):
            raise ValueError(f"path {path!r} is outside the model store {self.root}")
        return resolved

    def load(self, announcement: dict, device="cpu"):
        """(model, payload) of an announced version; raises ValueError / OSError if the file
        is missing, outside the store, altered (sha256) or not the announced version."""
        for key in ("version", "path", "sha256"):
            if not announcement.get(key):
                raise ValueError(f"announcement without {key}")
        path = self.resolve(announcement["path"])
        try:
            model, payload = load_checkpoint(path, device=device,
                                             expected_sha256=announcement["sha256"])
        except (ValueError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - an unreadable file is refused, not fatal
            raise ValueError(f"{path}: unreadable checkpoint ({exc.__class__.__name__}: {exc})")
        if payload["version"] != announcement["version"]:
            raise ValueError(f"{path} holds version {payload['version']}, "
                             f"announced as {announcement['version']}")
        return model, payload
