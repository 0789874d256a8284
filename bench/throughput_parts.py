"""The parts of bench/stream_throughput.py that need no broker: the click traffic, the rate of
the model alone, and reading the worker's batch-size histogram."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

N_ITEMS, N_USERS = 3417, 6040          # ML-1M after the 5-core: 3,416 items + pad, 6,040 users
TRAFFIC = ("uniform", "zipf", "ml-1m")


class Traffic:
    """One endless stream of (user id, item id) clicks; `pairs(start, n)` is its slice
    start..start+n. The backlog is the slice at 0 and the steady phase the slice after it, so
    every configuration of a run gets the same clicks.

    uniform: users and items drawn uniformly. zipf: users drawn with p(rank) proportional to
    1 / rank^a over the 6,040 users (rank-weighted, sampled with rng.choice: no truncation
    or folding needed, and user-0 is the most active), items uniform. ml-1m: the real log in
    time order, where users click in sessions."""

    def __init__(self, kind: str, zipf_a: float = 1.1):
        if kind not in TRAFFIC:
            raise ValueError(f"unknown traffic {kind!r}: choose one of {TRAFFIC}")
        self.kind, self.zipf_a = kind, zipf_a
        self.log = ml1m_log() if kind == "ml-1m" else None

    def pairs(self, start: int, n: int) -> tuple[list[str], list[str]]:
        if self.log is not None:
            users, items = self.log
            if start + n > len(users):
                raise ValueError(f"ml-1m has {len(users):,} clicks; this run needs {start + n:,}")
            return users[start:start + n].tolist(), items[start:start + n].tolist()
        # A seed per slice: the steady phase's clicks do not repeat the backlog's.
        rng = np.random.default_rng([1, start])
        if self.kind == "zipf":
            weights = 1.0 / np.arange(1, N_USERS + 1) ** self.zipf_a
            users = rng.choice(N_USERS, n, p=weights / weights.sum())
        else:
            users = rng.integers(0, N_USERS, n)
        items = rng.integers(1, N_ITEMS, n)
        return [f"user-{u}" for u in users], [f"item-{i}" for i in items]

    def describe(self) -> str:
        return f"zipf a={self.zipf_a}" if self.kind == "zipf" else self.kind


def ml1m_log() -> tuple[np.ndarray, np.ndarray]:
    """ML-1M's clicks in time order (file order on ties) as ("user-<id>", "item-<index>").

    The clicks are those of the offline protocol's 5-core (999,611 of 1,000,209), whose
    vocabulary is exactly the benchmark model's 3,416 items: item-<index> is the item's index
    in that vocabulary, so every click is an item the model knows."""
    from model.data.protocol import load_interactions, prepare

    raw = load_interactions("ml-1m")         # fetched into ~/.cache/mlsa4rec on first use
    data = prepare(raw)
    if data.n_items != N_ITEMS:
        raise RuntimeError(f"ml-1m's 5-core has {data.n_items - 1} items, the model {N_ITEMS - 1}")
    item_index = data.item_index()
    users_kept = set(data.user_ids)
    # After the iterative k-core, a click survives exactly when its user and its item both do.
    keep = np.fromiter((item in item_index and user in users_kept
                        for user, item in zip(raw.users, raw.items)), dtype=bool, count=len(raw))
    order = np.argsort(raw.timestamps[keep], kind="stable")
    # The wheel's user ids read "1m_<n>"; the number is MovieLens' own user id.
    users = np.array([f"user-{u.rsplit('_', 1)[-1]}" for u in raw.users[keep][order]])
    items = np.array([f"item-{item_index[i]}" for i in raw.items[keep][order]])
    return users, items


def model_only_rate(model, batch: int, device: str, seconds: float = 2.0,
                    step_rows: int = 0) -> float:
    """Users/s of the model alone: one batched step (or, for a window model, one forward over
    full 50-item windows, what the worker recomputes per click) + scores + top-10, as in
    bench/step_speed.py; step_rows > 0: the batch stepped and ranked that many users at a
    time, as the worker's --step-rows does. No Kafka, no table, no (de)serialisation: the
    ceiling for the worker's model thread."""
    model = model.to(device).eval()
    items = torch.randint(1, model.n_items, (batch,), device=device)
    if model.steppable:
        state = model.init_state(batch, device=device)
        rows = step_rows or batch

        def once():
            for start in range(0, batch, rows):     # each block's states advance in place
                block = {k: v[start:start + rows] for k, v in state.items()}
                _, user_repr = model.step(block, items[start:start + rows])
                torch.topk(model.scores(user_repr), 10, dim=1)
    else:
        width = model.config.max_len
        windows = torch.randint(1, model.n_items, (batch, width), device=device)
        lengths = torch.full((batch,), width, device=device)

        def once():
            torch.topk(model.scores(model(windows, lengths)), 10, dim=1)

    with torch.no_grad():
        once()                                   # warm-up (first call allocates)
        _sync(device)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            once()
            done += batch
        _sync(device)                            # CUDA runs ahead of the host: wait for it
    return done / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def scrape_histogram(port: int, name: str = "mlsa4rec_batch_size") -> dict | None:
    """{"count", "sum", "buckets": [(upper bound, cumulative count), ...]} of a Prometheus
    histogram on 127.0.0.1:port/metrics, or None if the worker does not expose it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        found = {"count": 0.0, "sum": 0.0, "buckets": []}
        for sample in family.samples:
            if sample.name == name + "_count":
                found["count"] = sample.value
            elif sample.name == name + "_sum":
                found["sum"] = sample.value
            elif sample.name == name + "_bucket":
                found["buckets"].append((float(sample.labels["le"]), sample.value))
        found["buckets"].sort()
        return found
    return None


def histogram_since(after: dict, before: dict) -> dict:
    """The observations made between two scrapes of the same histogram."""
    was = dict(before["buckets"])
    return {"count": after["count"] - before["count"], "sum": after["sum"] - before["sum"],
            "buckets": [(le, n - was.get(le, 0.0)) for le, n in after["buckets"]]}


def histogram_quantile(histogram: dict, q: float) -> float | None:
    """Upper bound of the first bucket whose cumulative count reaches q of all: only as fine as
    the buckets (a batch of 200 and one of 256 both read 256 with buckets ..., 128, 256)."""
    total = histogram["count"]
    if not total:
        return None
    for upper, cumulative in histogram["buckets"]:
        if cumulative >= q * total:
            return upper
    return float("inf")
