"""The approximate item index (model/item_index.py) against exact ranking at 3,416 / 100,000 /
1,000,000 items, batch 256, on embeddings that look like trained ones, in one run.

    .venv/bin/python bench/item_index.py [--checkpoint runs/ml-1m-mlsa4rec-s.pt]
        [--items 3416 100000 1000000] [--catalogues mixture jitter] [--probes 8 16 32 64]
        [--probe 32] [--hnsw-max-items 100000] [--queries 1024] [--seconds 6]

The checkpoint is an ML-1M model (train one: `mlsa4rec train --dataset ml-1m`). Its 3,415 item
embeddings are the 3,416-item catalogue (pad included); larger catalogues are those items plus
synthetic ones with their structure:
  - mixture: a Gaussian mixture fitted to the trained embeddings (k-means into 32 groups, each
    group's mean and full covariance);
  - jitter: a trained item drawn at random plus isotropic noise, its expected length half the
    median distance between a trained item and its nearest neighbour.
Queries are real user representations: the trained model's over each of `--queries` ML-1M
users' last 50 items. Recall@10 = the share of the exact top 10 (model/ranking.py) that the
index returns, over those users.

Table 1 (the choice of index): IVF at several probes and HNSW at several efSearch, search
alone, batches of 256, one thread. Table 2 (the worker's scorer end to end, `Scorer.process`:
step + top 10, batches of 256 new users, one torch and one faiss thread, like a worker): users/s
and batch latency, exact (block by block above 65,536 items) against the index at `--probe`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.checkpoint import checkpoint_data, load_checkpoint  # noqa: E402
from model.item_index import ItemIndex, default_lists  # noqa: E402
from model.models import build_model  # noqa: E402
from model.ranking import top_k  # noqa: E402
from streams.worker.scoring import Event, Scorer  # noqa: E402

BATCH = 256


def user_representations(model, payload, n: int, seed: int = 0) -> torch.Tensor:
    """The trained model's representation of n ML-1M users after their last 50 items."""
    data = checkpoint_data(payload)
    rng = np.random.default_rng(seed)
    users = rng.choice(data.n_users, size=min(n, data.n_users), replace=False)
    histories = [data.sequences[u][-50:] for u in users]
    items = torch.zeros(len(histories), 50, dtype=torch.long)
    for row, history in enumerate(histories):
        items[row, :len(history)] = torch.from_numpy(history)
    lengths = torch.tensor([len(h) for h in histories])
    with torch.no_grad():
        return model.prefill(items, lengths)[1].float()


def synthetic_items(trained: np.ndarray, n: int, kind: str, seed: int = 0) -> np.ndarray:
    """n items with the trained embeddings' structure (module doc)."""
    import faiss
    rng = np.random.default_rng(seed)
    dim = trained.shape[1]
    if kind == "jitter":
        index = faiss.IndexFlatL2(dim)
        index.add(trained)
        distances, _ = index.search(trained, 2)         # the nearest other item: column 1
        nearest = float(np.median(np.sqrt(np.maximum(distances[:, 1], 0))))
        noise = 0.5 * nearest / np.sqrt(dim)
        return (trained[rng.integers(0, len(trained), n)]
                + rng.normal(0, noise, (n, dim))).astype(np.float32)
    if kind == "random":                # the worst case, for reference only
        return rng.normal(trained.mean(0), trained.std(0), (n, dim)).astype(np.float32)
    groups = 32
    kmeans = faiss.Kmeans(dim, groups, niter=25, seed=seed)
    kmeans.train(trained)
    _, assignment = kmeans.index.search(trained, 1)
    assignment = assignment[:, 0]
    sizes = np.bincount(assignment, minlength=groups)
    picks = rng.choice(groups, size=n, p=sizes / sizes.sum())
    out = np.empty((n, dim), dtype=np.float32)
    for group in range(groups):
        members = trained[assignment == group]
        rows = np.flatnonzero(picks == group)
        if not len(rows):
            continue
        cov = np.cov(members, rowvar=False) if len(members) > 1 else np.zeros((dim, dim))
        cov += np.eye(dim) * 1e-3 * max(np.trace(cov) / dim, 1e-6)    # few members: full rank
        out[rows] = rng.multivariate_normal(members.mean(0), cov, size=len(rows))
    return out


def catalogue(trained_weight: torch.Tensor, n_known: int, rows: int, kind: str) -> torch.Tensor:
    """(rows, hidden): the pad row and the trained items, then synthetic items."""
    if rows <= n_known:
        return trained_weight[:rows].clone()
    trained = trained_weight[1:n_known].numpy()
    extra = synthetic_items(trained, rows - n_known, kind)
    return torch.cat([trained_weight[:n_known], torch.from_numpy(extra)])


def exact_top(queries, weight, n_known, k=10) -> torch.Tensor:
    torch.set_num_threads(2)            # ground truth only: not measured
    try:
        return top_k(queries, weight, k, n_known, block_items=65_536)[1]
    finally:
        torch.set_num_threads(1)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist()))
    return hits / exact.numel()


def search_rate(index: ItemIndex, queries: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(users/s of search alone in batches of 256, the top 10 of every query)."""
    found, started = [], time.perf_counter()
    for start in range(0, len(queries), BATCH):
        found.append(index.search(queries[start:start + BATCH], 10)[1])
    return len(queries) / (time.perf_counter() - started), torch.cat(found)


def served_model(trained_model, payload, weight: torch.Tensor):
    """The trained model over a catalogue of weight's rows (its other weights as trained)."""
    config = {k: v for k, v in payload["config"].items() if k not in ("model", "n_items")}
    model = build_model(payload["model"], weight.shape[0], config)
    state = {k: v for k, v in trained_model.state_dict().items() if k != "item_embedding.weight"}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        model.item_embedding.weight.copy_(weight)
    model.n_known = weight.shape[0]
    return model.eval()


def scorer_rate(scorer: Scorer, n_items: int, seconds: float) -> tuple[float, list[float]]:
    """(users/s, each batch's seconds) of scorer.process on batches of new users, one click
    each; at least 3 batches."""
    g = torch.Generator().manual_seed(0)
    latencies, started, round_ = [], time.perf_counter(), 0
    while time.perf_counter() - started < seconds or round_ < 3:
        items = torch.randint(1, n_items, (BATCH,), generator=g).tolist()
        events = [Event(f"u{round_}-{u}", scorer.item_ids[i], f"e{round_}-{u}", 0, 0, -1)
                  for u, i in enumerate(items)]
        t = time.perf_counter()
        scorer.process(events, {})
        latencies.append(time.perf_counter() - t)
        round_ += 1
    return BATCH * round_ / (time.perf_counter() - started), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/ml-1m-mlsa4rec-s.pt",
                        help="a trained ML-1M model (default runs/ml-1m-mlsa4rec-s.pt)")
    parser.add_argument("--items", type=int, nargs="+", default=[3416, 100_000, 1_000_000],
                        help="catalogue sizes, pad included (default 3416 100000 1000000)")
    parser.add_argument("--catalogues", nargs="+", default=["mixture", "jitter"],
                        choices=["mixture", "jitter", "random"],
                        help="synthetic items above the trained ones (default mixture jitter)")
    parser.add_argument("--probes", type=int, nargs="+", default=[16, 32, 48, 64, 96],
                        help="IVF lists searched per user, table 1 (default 16 32 48 64 96)")
    parser.add_argument("--codes", nargs="+", default=["flat", "fp16"],
                        choices=["flat", "fp16"],
                        help="IVF vector storage, table 1 (default flat fp16)")
    parser.add_argument("--ef", type=int, nargs="+", default=[16, 32, 64, 128],
                        help="HNSW efSearch, table 1 (default 16 32 64 128)")
    parser.add_argument("--hnsw-max-items", type=int, default=100_000,
                        help="build HNSW up to this many items (slow to build; default 100000)")
    parser.add_argument("--probe", type=int, default=32,
                        help="IVF probe of the scorer in table 2 (default 32, the worker's)")
    parser.add_argument("--queries", type=int, default=1024,
                        help="ML-1M users whose representations are the queries (default 1024)")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="measuring time per scorer row (default 6)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    trained_model, payload = load_checkpoint(args.checkpoint)
    n_known = len(payload["item_ids"])
    trained_weight = trained_model.item_embedding.weight.detach().float().cpu()
    queries = user_representations(trained_model, payload, args.queries)
    print(f"checkpoint {args.checkpoint}: {payload['model']}, {n_known:,} items, test "
          f"HR@10 {payload['metrics'].get('test', {}).get('hr@10', float('nan')):.4f}; "
          f"{len(queries):,} ML-1M users as queries; norms: items "
          f"{trained_weight[1:n_known].norm(dim=1).mean():.2f}, users "
          f"{queries.norm(dim=1).mean():.2f}\n", flush=True)
    choice, served = [], []
    for rows in args.items:
        kinds = ["trained"] if rows <= n_known else args.catalogues
        exact_scorer_row = None
        for kind in kinds:
            weight = catalogue(trained_weight, n_known, rows, kind)
            exact = exact_top(queries, weight, rows)
            lists = default_lists(rows - 1)
            for codes in args.codes:
                index = ItemIndex.build(weight, rows, probe=args.probes[0], codes=codes)
                mb = index.nbytes() / 2 ** 20
                for probe in args.probes:
                    index.ivf.nprobe = min(probe, lists)
                    rate, found = search_rate(index, queries)
                    choice.append(f"| {rows:,} | {kind} | IVF {lists:,} lists, {codes} | probe "
                                  f"{probe} | {index.build_seconds:.1f} | {mb:,.0f} | "
                                  f"{recall(found, exact):.4f} | {rate:,.0f} |")
                    print(choice[-1], flush=True)
                del index
            if rows <= args.hnsw_max_items:
                hnsw = ItemIndex.build(weight, rows, kind="hnsw", probe=args.ef[0])
                hnsw_mb = hnsw.nbytes() / 2 ** 20
                for ef in args.ef:
                    hnsw.probe = ef
                    rate, found = search_rate(hnsw, queries)
                    choice.append(f"| {rows:,} | {kind} | HNSW 32 links | efSearch {ef} | "
                                  f"{hnsw.build_seconds:.1f} | {hnsw_mb:,.0f} | "
                                  f"{recall(found, exact):.4f} | {rate:,.0f} |")
                    print(choice[-1], flush=True)
                del hnsw
            index = ItemIndex.build(weight, rows, probe=args.probe)     # the worker's kind
            _, found = search_rate(index, queries)
            chosen_recall = recall(found, exact)
            del index
            model = served_model(trained_model, payload, weight)
            item_ids = ["[PAD]"] + [f"item-{i}" for i in range(1, rows)]
            if exact_scorer_row is None:        # exact speed does not depend on the data
                scorer = Scorer(model, item_ids, "bench", trace_step=True)
                users_s, latencies = scorer_rate(scorer, rows, args.seconds)
                block = min(rows, scorer.exact_rank_items)
                exact_scorer_row = (users_s, latencies, BATCH * block * 4 / 2 ** 20)
                served.append(row_text(rows, "-", "exact", users_s, latencies, "1 (exact)",
                                       f"{BATCH * block * 4 / 2 ** 20:,.0f} (scores)", "-"))
                print(served[-1], flush=True)
                del scorer
            scorer = Scorer(model, item_ids, "bench", trace_step=True, ann="faiss", ann_items=0,
                            ann_probe=args.probe)
            users_s, latencies = scorer_rate(scorer, rows, args.seconds)
            ranking = f"IVF {scorer.ann_index.codes}, probe {min(args.probe, lists)}/{lists:,}"
            served.append(row_text(
                rows, kind, ranking, users_s, latencies, f"{chosen_recall:.4f}",
                f"{scorer.ann_index.nbytes() / 2 ** 20:,.0f} (index)",
                f"{scorer.ann_index.build_seconds:.1f}",
                ratio=users_s / exact_scorer_row[0]))
            print(served[-1], flush=True)
            del scorer, model, weight
    print("\nTable 1: index choice (search alone, batches of 256, one thread)\n")
    print("| items | catalogue | index | setting | build s | MB | recall@10 | users/s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(choice))
    print("\nTable 2: the scorer end to end (step + top 10, batch 256, one thread)\n")
    print("| items | catalogue | ranking | users/s | x exact | p50 ms | p99 ms | batches | "
          "recall@10 | ranking memory MB | index build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(served))
    print(f"\n(run took {time.perf_counter() - started:.0f} s)")


def row_text(rows, kind, ranking, users_s, latencies, recall_text, memory, build,
             ratio: float = 1.0) -> str:
    ms = np.array(latencies) * 1000
    return (f"| {rows:,} | {kind} | {ranking} | {users_s:,.0f} | {ratio:.2f} | "
            f"{np.percentile(ms, 50):,.0f} | {np.percentile(ms, 99):,.0f} | {len(ms)} | "
            f"{recall_text} | {memory} | {build} |")


if __name__ == "__main__":
    main()
