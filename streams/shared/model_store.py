"""Model versions in a store, and what a version announcement says.

The store is a directory, or any fsspec URL (s3://bucket/models, gs://..., memory://...) where
the filesystem's package is installed. A version = one checkpoint file (weights, config,
item-id map, metrics; model/checkpoint.py), written under a temporary name and moved into
place, then announced:
    {"version", "path" (relative to the store), "sha256", "created_at" (ms), "parent",
     "trained_through" (ms timestamp of the newest event it trained on, or null)}
A reader loads a version only from inside its own store and only after the sha256 matches.
"""

from __future__ import annotations

import posixpath
import tempfile
import time
from pathlib import Path

import fsspec

from model.checkpoint import load_checkpoint_bytes, new_version, save_checkpoint


class ModelStore:
    def __init__(self, root: str | Path):
        self.root = root
        self.fs, base = fsspec.core.url_to_fs(str(root))
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                else (self.fs.protocol,))
        self.base = str(Path(base).resolve()) if self.local else base.rstrip("/")
        self.fs.makedirs(self.base, exist_ok=True)

    def publish(self, model, item_ids: list[str], metrics: dict, parent: str | None,
                trained_through: int | None = None, version: str | None = None) -> dict:
        version = version or new_version()
        name = f"{version}.pt"
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            sha = save_checkpoint(local, model, item_ids, metrics, version=version,
                                  extra={"parent": parent})
            target = posixpath.join(self.base, name)
            self.fs.put_file(str(local), target + ".tmp")
            self.fs.mv(target + ".tmp", target)     # readers never see a partial file
        return {"version": version, "path": name, "sha256": sha,
                "created_at": int(time.time() * 1000), "parent": parent,
                "trained_through": trained_through}

    def resolve(self, path: str) -> str:
        """The file an announcement names; refuses anything outside the store."""
        if self.local:
            resolved = (Path(self.base) / path).resolve()
            inside = resolved.is_relative_to(Path(self.base))
        else:
            resolved = posixpath.normpath(posixpath.join(self.base, path))
            inside = resolved.startswith(self.base + "/")
        if not inside:
            raise ValueError(f"path {path!r} is outside the model store {self.root}")
        return str(resolved)

    def load(self, announcement: dict, device="cpu"):
        """(model, payload) of an announced version; raises ValueError / OSError if the file
        is missing, outside the store, altered (sha256) or not the announced version."""
        for key in ("version", "path", "sha256"):
            if not announcement.get(key):
                raise ValueError(f"announcement without {key}")
        path = self.resolve(announcement["path"])
        data = self.fs.cat_file(path)                   # OSError if missing
        # ValueError for an altered (sha256) or unreadable file: refused, not fatal
        model, payload = load_checkpoint_bytes(data, device, announcement["sha256"], path)
        if payload["version"] != announcement["version"]:
            raise ValueError(f"{path} holds version {payload['version']}, "
                             f"announced as {announcement['version']}")
        return model, payload
