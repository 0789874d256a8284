"""Approximate top k over a large catalogue: a faiss index of the item embeddings.

The model scores an item by the dot product of the user's representation with the item's
embedding row (`model.scores`: no bias, no normalisation), so this is maximum inner product
search. model/ranking.py gets the exact top k, but that costs (users x items x hidden)
multiply-adds: ~2 s for a batch of 256 users over a million items on one core here. An IVF
index (inverted lists, flat vectors) looks at `probe` of its `lists` groups of items per
user instead of all of them; the scores it returns are still exact dot products, only an
item in a group it does not look at can be missed (recall; docs/RESULTS.md says how much).

faiss (faiss-cpu) is an optional dependency (`pip install -e '.[ann]'`): this module imports
without it, and `build` raises `IndexUnavailable` with the install line when it is missing.

Row 0 of the embedding is the pad and rows from n_known on are spare rows (model/vocab.py):
neither is indexed, so neither is ever returned.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

KINDS = ("ivf", "hnsw")


class IndexUnavailable(RuntimeError):
    """faiss is not installed."""


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise IndexUnavailable(
            "the approximate item index needs faiss: pip install -e '.[ann]' (faiss-cpu)") from exc
    return faiss


def default_lists(n_items: int) -> int:
    """IVF lists for a catalogue: ~sqrt(items), so a list holds ~sqrt(items) items, at least
    40 items per list (fewer and k-means has too little to fit each centroid on)."""
    return max(1, min(int(round(math.sqrt(n_items))), n_items // 40))


class ItemIndex:
    """Inner-product top k over item rows 1..n_known-1 of an embedding; see the module doc.

    kind "ivf" (the default; chosen by measurement, docs/RESULTS.md): `lists` groups found by
    k-means, `probe` of them searched per user. "hnsw": a graph, `probe` = its efSearch.
    threads: faiss's OpenMP threads for build and search (the worker runs one)."""

    def __init__(self, index, kind: str, n_known: int, probe: int, threads: int,
                 build_seconds: float):
        self.faiss_index, self.kind, self.n_known = index, kind, n_known
        self.probe, self.threads, self.build_seconds = probe, threads, build_seconds

    @classmethod
    def build(cls, item_weight: torch.Tensor, n_known: int, kind: str = "ivf",
              lists: int = 0, probe: int = 32, hnsw_links: int = 32, threads: int = 1,
              seed: int = 0) -> "ItemIndex":
        """item_weight: (rows, hidden), the model's item embedding; rows 1..n_known-1 are
        indexed. lists: IVF lists (0 = default_lists(items)); probe: lists searched per user
        (IVF) or efSearch (HNSW)."""
        faiss = _faiss()
        if kind not in KINDS:
            raise ValueError(f"item index kind must be one of {KINDS}, not {kind!r}")
        if n_known < 2 or n_known > item_weight.shape[0]:
            raise ValueError(f"n_known {n_known}: must be 2..{item_weight.shape[0]} "
                             "(row 0 is the pad)")
        if probe < 1:
            raise ValueError(f"probe must be at least 1, not {probe}")
        started = time.perf_counter()
        faiss.omp_set_num_threads(threads)
        vectors = np.ascontiguousarray(
            item_weight[1:n_known].detach().float().cpu().numpy())
        dim = vectors.shape[1]
        if kind == "ivf":
            lists = lists or default_lists(len(vectors))
            if not 1 <= lists <= len(vectors):
                raise ValueError(f"lists must be 1..{len(vectors)} (the items), not {lists}")
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            # k-means on at most 64 items per list: enough to place the centroids, and the
            # fit of a million-item catalogue takes seconds, not minutes.
            index.cp.max_points_per_centroid = 64
            index.train(vectors)
            index.add(vectors)
            index.nprobe = min(probe, lists)
        else:
            index = faiss.IndexHNSWFlat(dim, hnsw_links, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 64
            index.add(vectors)
            index.hnsw.efSearch = probe
        return cls(index, kind, n_known, probe, threads, time.perf_counter() - started)

    def __len__(self) -> int:
        return self.n_known - 1

    def nbytes(self) -> int:
        """Bytes the index holds (its serialised size: vectors, ids, lists or graph)."""
        return int(_faiss().serialize_index(self.faiss_index).size)

    def search(self, user_repr: torch.Tensor, k: int,
               exclude: list[list[int]] | None = None, exhaustive: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, item indices), each (batch, k'), best first, k' = min(k, items); like
        model.ranking.top_k. exclude[row]: item indices that row must not get: the index is
        asked for k + len(exclude[row]) items (the longest row's) and those are dropped, so
        a row still gets k items. A row it finds fewer for is padded with score -inf, item 0.
        exhaustive: IVF only, search every list (the exact top k; for tests)."""
        faiss = _faiss()
        batch = user_repr.shape[0]
        k = min(k, len(self))
        if exclude and len(exclude) != batch:
            raise ValueError(f"exclude has {len(exclude)} rows, the batch {batch}")
        extra = max((len(row) for row in exclude), default=0) if exclude else 0
        ask = min(k + extra, len(self))
        faiss.omp_set_num_threads(self.threads)     # process-wide: the worker's threads
        queries = np.ascontiguousarray(user_repr.detach().float().cpu().numpy())
        if self.kind == "ivf":
            # Each search sets its own probe: a test's exhaustive search leaves no trace.
            params = faiss.SearchParametersIVF(
                nprobe=self.faiss_index.nlist if exhaustive else self.faiss_index.nprobe)
        else:
            if exhaustive:
                raise ValueError("an HNSW index cannot search exhaustively")
            params = faiss.SearchParametersHNSW(efSearch=max(self.probe, ask))
        scores, ids = self.faiss_index.search(queries, ask, params=params)
        items = np.where(ids >= 0, ids + 1, 0)      # faiss id i is item row i + 1
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        if extra:
            width = extra
            banned = np.zeros((batch, width), dtype=np.int64)   # 0: the pad, never returned
            for row, items_ in enumerate(exclude):
                banned[row, :len(items_)] = items_
            drop = (items[:, :, None] == banned[:, None, :]).any(axis=2) | (items == 0)
            # Kept items first, in their order (a stable sort of the drop flags).
            order = np.argsort(drop, axis=1, kind="stable")
            items = np.take_along_axis(items, order, axis=1)
            scores = np.take_along_axis(np.where(drop, -np.inf, scores), order, axis=1)
            items = np.where(np.isfinite(scores), items, 0)
        return (torch.from_numpy(np.ascontiguousarray(scores[:, :k])).to(user_repr.device),
                torch.from_numpy(np.ascontiguousarray(items[:, :k])).to(user_repr.device))
