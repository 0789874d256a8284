"""Approximate top k over a large catalogue: a faiss index of the item embeddings.

The model scores an item by the dot product of the user's representation with the item's
embedding row (`model.scores`: no bias, no normalisation), so this is maximum inner product
search. model/ranking.py gets the exact top k, but that costs (users x items x hidden)
multiply-adds: ~2 s for a batch of 256 users over a million items on one core here. An IVF
index (inverted lists) looks at `probe` of its `lists` groups of items per user instead of
all of them; the scores it returns are still exact dot products (re-scored from the model's
embedding), only an item in a group it does not look at can be missed (recall;
docs/RESULTS.md, section 4i, says how much).

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
# How an IVF index stores the vectors it scans: "flat" (float32) or "fp16" (half the bytes to
# read per item scanned; the scan is bound by memory). Either way the
# best candidates are re-scored exactly from the model's embedding, REFINE[codes] x the k asked.
CODES = ("flat", "fp16")
REFINE = {"flat": 1, "fp16": 2}


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

    kind "ivf" (the default; chosen by measurement, docs/RESULTS.md 4i): `lists` groups found
    by k-means, `probe` of them searched per user. "hnsw": a graph, `probe` = its efSearch.
    threads: faiss's OpenMP threads for build and search (the worker runs one)."""

    def __init__(self, index, item_weight: torch.Tensor, kind: str, n_known: int, probe: int,
                 threads: int, build_seconds: float, codes: str):
        self.faiss_index, self.kind, self.n_known, self.codes = index, kind, n_known, codes
        # The model's own embedding (not a copy): candidates are re-scored from it.
        self.item_weight = item_weight.detach()
        self.probe, self.threads, self.build_seconds = probe, threads, build_seconds
        self.ivf = _faiss().extract_index_ivf(index) if kind == "ivf" else None

    @classmethod
    def build(cls, item_weight: torch.Tensor, n_known: int, kind: str = "ivf",
              lists: int = 0, probe: int = 32, hnsw_links: int = 32, threads: int = 1,
              seed: int = 0, codes: str = "fp16") -> "ItemIndex":
        """item_weight: (rows, hidden), the model's item embedding; rows 1..n_known-1 are
        indexed. lists: IVF lists (0 = default_lists(items)); probe: lists searched per user
        (IVF) or efSearch (HNSW); codes: how IVF stores the vectors it scans (CODES)."""
        faiss = _faiss()
        if kind not in KINDS:
            raise ValueError(f"item index kind must be one of {KINDS}, not {kind!r}")
        if codes not in CODES:
            raise ValueError(f"item index codes must be one of {CODES}, not {codes!r}")
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
            vectors = _lengthened(vectors)
            dim = vectors.shape[1]
            quantizer = faiss.IndexFlatL2(dim)
            if codes == "flat":
                index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_L2)
            else:
                index = faiss.IndexIVFScalarQuantizer(
                    quantizer, dim, lists, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
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
            codes = "graph"
        return cls(index, item_weight, kind, n_known, probe, threads,
                   time.perf_counter() - started, codes)

    def __len__(self) -> int:
        return self.n_known - 1

    def nbytes(self) -> int:
        """Bytes the index holds (its serialised size: codes, ids, lists or graph), besides
        the model's embedding it re-scores from."""
        return int(_faiss().serialize_index(self.faiss_index).size)

    def search(self, user_repr: torch.Tensor, k: int,
               exclude: list[list[int]] | None = None, exhaustive: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, item indices), each (batch, k'), best first, k' = min(k, items); like
        model.ranking.top_k. exclude[row]: item indices that row must not get: the index is
        asked for k + len(exclude[row]) items (the longest row's) and those are dropped, so
        a row still gets k items. A row it finds fewer for is padded with score -inf, item 0.
        exhaustive: IVF only, every list searched and every item re-scored (the exact top k;
        for tests)."""
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
            queries = np.hstack([queries, np.zeros((batch, self.ivf.d - queries.shape[1]),
                                                   np.float32)])
            # Each search sets its own probe: a test's exhaustive search leaves no trace.
            params = faiss.SearchParametersIVF(nprobe=self.ivf.nlist if exhaustive
                                               else self.ivf.nprobe)
            # fp16 distances order the candidates nearly right: the best REFINE x asked are
            # re-scored exactly below.
            candidates = len(self) if exhaustive else min(ask * REFINE[self.codes], len(self))
        else:
            if exhaustive:
                raise ValueError("an HNSW index cannot search exhaustively")
            params = faiss.SearchParametersHNSW(efSearch=max(self.probe, ask))
            candidates = ask
        _, ids = self.faiss_index.search(queries, candidates, params=params)
        device = self.item_weight.device
        ids = torch.from_numpy(ids).to(device)
        items = torch.where(ids >= 0, ids + 1, 0)       # faiss id i is item row i + 1
        # Exact dot products from the model's embedding, as model.scores gives them.
        scores = torch.einsum("bd,bkd->bk", user_repr.to(device).float(),
                              self.item_weight[items].float())
        scores = scores.masked_fill(ids < 0, -torch.inf)
        if extra:
            banned = torch.zeros((batch, extra), dtype=torch.long)  # 0: never a candidate
            for row, items_ in enumerate(exclude):
                banned[row, :len(items_)] = torch.tensor(items_, dtype=torch.long)
            banned = banned.to(device)
            dropped = (items[:, :, None] == banned[:, None, :]).any(dim=2) | (items == 0)
            scores = scores.masked_fill(dropped, -torch.inf)
        scores, order = torch.topk(scores, k, dim=1)
        items = torch.gather(items, 1, order).masked_fill(scores == -torch.inf, 0)
        return scores.to(user_repr.device), items.to(user_repr.device)


def _lengthened(vectors: np.ndarray) -> np.ndarray:
    """Inner product as nearest neighbours: each item one coordinate longer,
    sqrt(M^2 - |x|^2) (M: the longest item), and a user 0 there (`search`): then
    |u - x|^2 = |u|^2 + M^2 - 2 u.x, smallest for the largest u.x. k-means in that space
    groups items by length as well as direction, which IVF over inner products does not:
    recall@10 0.958 against 0.914 with 32 of 1,000 lists at a million items (RESULTS 4i).
    Zeros after it up to a multiple of 8 coordinates: faiss's SIMD scan of fp16 codes needs
    that: at 65 coordinates fp16 lists scanned 5-7x slower than float32 ones (RESULTS 4i)."""
    lengths = np.linalg.norm(vectors, axis=1)
    longest = float(lengths.max())
    extra = np.sqrt(np.maximum(longest ** 2 - lengths ** 2, 0.0))
    width = -(-(vectors.shape[1] + 1) // 8) * 8
    out = np.zeros((len(vectors), width), dtype=np.float32)
    out[:, :vectors.shape[1]] = vectors
    out[:, vectors.shape[1]] = extra
    return out
