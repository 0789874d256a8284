"""RecBole's sequential-recommendation protocol: 5-core, time order, leave-one-out.

Indexing: item 0 is the padding item; real items get 1..n in order of first
appearance in the filtered file. Users are numbered 0..n_users-1 (no pad row),
also by first appearance, and `sequences[u]` belongs to `user_ids[u]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import DATASETS, Interactions, load_movielens
from .userlog import load_user_log, parse_timestamp

PAD = "[PAD]"


@dataclass
class SequenceData:
    item_ids: list[str]  # index -> raw item id; item_ids[0] == PAD
    user_ids: list[str]  # index -> raw user id
    sequences: list[np.ndarray]  # int64 item indices per user, time ordered
    timestamps: list[np.ndarray]  # float64, aligned with sequences

    @property
    def n_items(self) -> int:
        return len(self.item_ids)  # includes the pad row (embedding table size)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def item_index(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.item_ids)}


@dataclass
class EvalSplit:
    inputs: list[np.ndarray]  # history per user
    targets: np.ndarray  # int64, next item per user


def load_interactions(source: str, cache_dir: str | os.PathLike | None = None) -> Interactions:
    """"ml-1m", "ml-100k", or a path to a .csv / .parquet user log."""
    if source in DATASETS:
        return load_movielens(source, cache_dir)
    if Path(source).suffix.lower() in (".csv", ".parquet", ".pq"):
        return load_user_log(source)
    raise ValueError(f"unknown source {source!r}: use {sorted(DATASETS)} or a .csv/.parquet path")


def until(inter: Interactions, before: float) -> Interactions:
    """The events strictly before `before` (seconds), in file order."""
    keep = np.asarray(inter.timestamps, dtype=np.float64) < before
    return _subset(inter, keep)


def _subset(inter: Interactions, keep: np.ndarray) -> Interactions:
    ratings = inter.ratings[keep] if inter.ratings is not None else None
    return Interactions(inter.users[keep], inter.items[keep], inter.timestamps[keep], ratings)


def rated_at_least(inter: Interactions, min_rating: float) -> Interactions:
    """The events rated >= min_rating, in file order (RecBole's `val_interval` on rating)."""
    if inter.ratings is None:
        raise ValueError(f"min_rating {min_rating} needs ratings, and this log has none")
    return _subset(inter, inter.ratings >= min_rating)


def first_use_codes(values: np.ndarray) -> tuple[np.ndarray, list]:
    """Integer codes in order of first appearance (a dict is much faster than
    sorting 1M Python strings)."""
    table: dict = {}
    codes = np.fromiter((table.setdefault(v, len(table)) for v in values),
                        dtype=np.int64, count=len(values))
    return codes, list(table)


def _reorder_by_first_use(codes: np.ndarray, n: int) -> np.ndarray:
    """Map old codes to 0..k-1 by first appearance in `codes`; unused codes -> -1."""
    present, first = np.unique(codes, return_index=True)
    ranked = present[np.argsort(first, kind="stable")]
    remap = np.full(n, -1, dtype=np.int64)
    remap[ranked] = np.arange(len(ranked))
    return remap


def k_core_mask(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Iterative k-core on integer codes: dropping items can push users back under
    the threshold (and vice versa), so repeat until nothing changes."""
    keep = np.ones(len(users), dtype=bool)
    nu, ni = int(users.max(initial=-1)) + 1, int(items.max(initial=-1)) + 1
    while True:
        u_cnt = np.bincount(users[keep], minlength=nu)
        i_cnt = np.bincount(items[keep], minlength=ni)
        bad = keep & ((u_cnt[users] < min_user) | (i_cnt[items] < min_item))
        if not bad.any():
            return keep
        keep &= ~bad


def prepare(inter: Interactions, min_user_inter: int = 5, min_item_inter: int = 5,
            min_rating: float = 0.0) -> SequenceData:
    """Protocol: events rated below min_rating dropped (0 = keep all), then the iterative
    k-core, then each user's sequence in time order. RecBole's ML-1M benchmark table uses
    min_rating 3 and a 10-core (834,449 interactions, 3,123 items); the issue's protocol
    keeps every rating with a 5-core."""
    if min_rating:
        inter = rated_at_least(inter, min_rating)
    user_codes, user_raw = first_use_codes(inter.users)
    item_codes, item_raw = first_use_codes(inter.items)
    keep = k_core_mask(user_codes, item_codes, min_user_inter, min_item_inter)
    u, i = user_codes[keep], item_codes[keep]
    ts = np.asarray(inter.timestamps, dtype=np.float64)[keep]

    u_map = _reorder_by_first_use(u, len(user_raw))
    i_map = _reorder_by_first_use(i, len(item_raw))
    u_new = u_map[u]
    i_new = i_map[i] + 1  # 0 is padding
    user_ids = [None] * int(u_new.max(initial=-1) + 1)
    for old, new in enumerate(u_map):
        if new >= 0:
            user_ids[new] = user_raw[old]
    item_ids = [PAD] + [None] * int(i_map.max(initial=-1) + 1)
    for old, new in enumerate(i_map):
        if new >= 0:
            item_ids[new + 1] = item_raw[old]

    # Two stable passes = sort by (user, timestamp) with ties in file order.
    by_time = np.argsort(ts, kind="stable")
    order = by_time[np.argsort(u_new[by_time], kind="stable")]
    bounds = np.cumsum(np.bincount(u_new, minlength=len(user_ids)))[:-1]
    sequences = np.split(i_new[order], bounds) if len(user_ids) else []
    stamps = np.split(ts[order], bounds) if len(user_ids) else []
    return SequenceData(item_ids=item_ids, user_ids=user_ids,
                        sequences=list(sequences), timestamps=list(stamps))


def held_out_titles(inter: Interactions, before: float, share: float, seed: int = 0) -> list[str]:
    """A random `share` of the items clicked both before and after `before` (numpy's
    generator seeded `seed`), sorted: titles to keep out of a model trained before it, so that
    they come after it as titles the model has never seen (an item cold start). Items first
    clicked after `before` are new titles anyway."""
    earlier = np.asarray(inter.timestamps, dtype=np.float64) < before
    candidates = sorted(set(map(str, inter.items[~earlier])) & set(map(str, inter.items[earlier])))
    chosen = np.random.default_rng(seed).choice(candidates, int(round(share * len(candidates))),
                                                replace=False)
    return sorted(map(str, chosen))             # plain str: checkpoints load weights-only


def prepare_for_run(train_config: dict) -> SequenceData:
    """The data exactly as a training run saw it, from its (checkpoint's) train config:
    dataset, `before`, `hold_out_titles`, `min_rating` and `k_core` (configs saved before
    these options existed get the defaults)."""
    inter = load_interactions(train_config["dataset"])
    share = train_config.get("hold_out_titles", 0.0)
    if not 0 <= share < 1 or (share and not train_config.get("before")):
        raise ValueError(f"--hold-out-titles {share}: must be in [0, 1), and needs --before")
    if train_config.get("before"):
        before = parse_timestamp(train_config["before"])
        held_out = held_out_titles(inter, before, share) if share else []
        inter = until(inter, before)
        if held_out:
            inter = _subset(inter, ~np.isin(inter.items.astype(str), held_out))
    k = train_config.get("k_core", 5)
    return prepare(inter, k, k, train_config.get("min_rating", 0.0))


def split_leave_one_out(data: SequenceData) -> tuple[list[np.ndarray], EvalSplit, EvalSplit]:
    """train: seq[:-2]; valid: seq[:-2] -> seq[-2]; test: seq[:-1] -> seq[-1]."""
    for u, seq in enumerate(data.sequences):
        if len(seq) < 3:
            raise ValueError(f"user {data.user_ids[u]!r} has {len(seq)} interactions; "
                             "leave-one-out needs at least 3")
    train = [seq[:-2] for seq in data.sequences]
    valid = EvalSplit(inputs=[seq[:-2] for seq in data.sequences],
                      targets=np.array([seq[-2] for seq in data.sequences], dtype=np.int64))
    test = EvalSplit(inputs=[seq[:-1] for seq in data.sequences],
                     targets=np.array([seq[-1] for seq in data.sequences], dtype=np.int64))
    return train, valid, test
