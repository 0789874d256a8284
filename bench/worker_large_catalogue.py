"""The real worker on Kafka at 3,416 / 100,000 / 1,000,000 items (issue 17 §2), in one run:
events/s of a drained backlog, its batch sizes, latency p50/p99 at one fixed offered rate,
the recall@10 of the ranking the worker uses, and each row's ratio to the 3,416-item row.

    .venv/bin/python bench/worker_large_catalogue.py [--checkpoint /tmp/ann/ml-1m-mlsa4rec-s.pt]
        [--items 3416 100000 1000000] [--indexed-too 100000] [--catalogue mixture]
        [--events 6000] [--rate 300] [--latency-seconds 10] [--queries 1024]
        [--worker-arg=--ann-probe=48 ...]

Each row is one `python -m cli worker` (bench/stream_throughput.py `measure`: a backlog of
`--events` clicks drained, events/s from the first recommendation to the last, then clicks
at `--rate` for `--latency-seconds`, batch 256) on the local broker, serving a checkpoint
written for that row: the trained ML-1M model (its 3,415 items, pad included in the 3,416),
and for larger catalogues the same model over those items plus synthetic ones with their
structure (bench/item_index.py `catalogue`, "mixture" by default), under new ids. The clicks
are ML-1M's items (bench/throughput_parts.py `Traffic`, uniform over 6,040 users); the
ranking runs over the whole catalogue.

The worker ranks with its own defaults (`--ann auto --ann-items 100000 --ann-probe 32`,
streams/shared/config.py): exactly up to 100,000 items (block by block above 65,536), by
the faiss IVF index above. `--indexed-too N` adds a row at N items with the index forced
(`--ann faiss --ann-items 0`). Recall@10 of an indexed row: the index built as the worker
builds it (model/item_index.py, same catalogue, same probe, one thread), searched with the
trained model's representations of `--queries` real ML-1M users after their last 50 items,
against the exact top 10 (bench/item_index.py `user_representations`, `exact_top`,
`recall`); computed here before that row's worker starts. Exact rows: 1 by construction.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.item_index import (  # noqa: E402
    catalogue, exact_top, recall, search_rate, served_model, user_representations)
from bench.stream_throughput import Config, measure  # noqa: E402
from bench.throughput_parts import Traffic  # noqa: E402
from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.item_index import ItemIndex, default_lists  # noqa: E402
from streams.shared.config import StreamConfig  # noqa: E402
from tests.kafka_broker import kafka_bootstrap  # noqa: E402

BATCH = 256
DEFAULTS = StreamConfig()          # the worker's --ann / --ann-items / --ann-probe


def row_plan(items: list[int], indexed_too: list[int]) -> list[tuple[int, bool]]:
    """(catalogue rows, index forced?) per row, in catalogue order, defaults before forced."""
    plan = [(n, False) for n in items] + [(n, True) for n in indexed_too]
    return sorted(plan, key=lambda row: (row[0], row[1]))


def ranking_of(rows: int, forced: bool, probe: int) -> tuple[bool, str]:
    """(indexed?, how the worker ranks a catalogue of `rows` ids, pad included)."""
    indexed = forced or (DEFAULTS.ann != "exact" and rows > DEFAULTS.ann_items)
    if indexed:
        return True, f"IVF fp16, probe {min(probe, default_lists(rows - 1))}/{default_lists(rows - 1):,}"
    if rows > DEFAULTS.exact_rank_items:
        return False, "exact, blocked"
    return False, "exact"


def write_row_checkpoint(path: Path, trained_model, payload, weight: torch.Tensor) -> None:
    """The trained model over `weight`'s rows, its items renamed item-<row> (the ids the
    clicks use; ML-1M's are rows 1..3,415, the same in every catalogue)."""
    model = served_model(trained_model, payload, weight)
    item_ids = ["[PAD]"] + [f"item-{i}" for i in range(1, weight.shape[0])]
    save_checkpoint(path, model, item_ids, {"source": str(payload.get("version"))},
                    version=f"bench-{weight.shape[0]}")


def index_recall(weight: torch.Tensor, rows: int, probe: int, queries, exact) -> tuple[float, float]:
    """(recall@10 of the worker's index over this catalogue, its build seconds)."""
    index = ItemIndex.build(weight, rows, probe=probe, threads=1)
    _, found = search_rate(index, queries)
    return recall(found, exact), index.build_seconds


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/ann/ml-1m-mlsa4rec-s.pt",
                        help="a trained ML-1M model (default /tmp/ann/ml-1m-mlsa4rec-s.pt)")
    parser.add_argument("--items", type=int, nargs="+", default=[3416, 100_000, 1_000_000],
                        help="catalogue sizes, pad included (default 3416 100000 1000000)")
    parser.add_argument("--indexed-too", type=int, nargs="*", default=[100_000],
                        help="also run these sizes with the index forced (default 100000)")
    parser.add_argument("--catalogue", choices=["mixture", "jitter"], default="mixture",
                        help="synthetic items above the trained ones (default mixture)")
    parser.add_argument("--events", type=int, default=6000, help="backlog clicks per row")
    parser.add_argument("--rate", type=float, default=300.0,
                        help="offered clicks/s of every row's latency phase (default 300)")
    parser.add_argument("--latency-seconds", type=float, default=10.0,
                        help="length of the latency phase (default 10)")
    parser.add_argument("--queries", type=int, default=1024,
                        help="ML-1M users whose representations measure recall (default 1024)")
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="appended to every worker's command line (repeatable)")
    args = parser.parse_args()
    args.device = "cpu"                   # measure() and run_worker() read it
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="mlsa4rec-worker-catalogue-"))
    trained_model, payload = load_checkpoint(args.checkpoint)
    n_known = len(payload["item_ids"])
    trained_weight = trained_model.item_embedding.weight.detach().float().cpu()
    queries = user_representations(trained_model, payload, args.queries)
    probe = next((int(a.split("=", 1)[1]) for a in reversed(args.worker_arg)
                  if a.startswith("--ann-probe=")), DEFAULTS.ann_probe)
    traffic = Traffic("uniform")
    results = []
    with kafka_bootstrap() as bootstrap:
        print(f"broker {bootstrap}; checkpoint {args.checkpoint} ({payload['model']}, "
              f"{n_known:,} items); catalogue {args.catalogue}; {args.events} backlog "
              f"clicks, latency at {args.rate:.0f}/s for {args.latency_seconds:.0f} s; "
              f"batch {BATCH}; worker args {args.worker_arg}; files in {tmp}", flush=True)
        for rows, forced in row_plan(args.items, args.indexed_too):
            results.append(run_row(bootstrap, rows, forced, probe, trained_model, payload,
                                   trained_weight, queries, traffic, args, tmp))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "batch buckets"}),
                  flush=True)
    print_table(results, args)
    print(f"\n(run took {time.perf_counter() - started:.0f} s)")
    if not any("error" in r for r in results):
        shutil.rmtree(tmp, ignore_errors=True)        # else the workers' logs stay there


def run_row(bootstrap, rows, forced, probe, trained_model, payload, trained_weight, queries,
            traffic, args, tmp: Path) -> dict:
    """One catalogue: its checkpoint, its recall (indexed rows), then its worker measured."""
    n_known = len(payload["item_ids"])
    weight = catalogue(trained_weight, n_known, rows, args.catalogue)
    indexed, ranking = ranking_of(rows, forced, probe)
    row = {"items": rows, "catalogue": "trained" if rows <= n_known else args.catalogue,
           "ranking": ranking, "recall@10": 1.0}
    if indexed:
        exact = exact_top(queries, weight, rows)
        row["recall@10"], row["index build s"] = index_recall(weight, rows, probe, queries, exact)
    path = tmp / f"items-{rows}.pt"
    write_row_checkpoint(path, trained_model, payload, weight)
    del weight
    row_args = copy.copy(args)
    row_args.worker_arg = (["--ann=faiss", "--ann-items=0"] if forced else []) \
        + list(args.worker_arg)
    config = Config(f"{rows} items, {ranking}", payload["model"], BATCH, DEFAULTS.state_dtype,
                    path, REPO)
    try:
        row.update(measure(bootstrap, config, traffic, row_args, tmp))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        row["error"] = " ".join(str(exc).split())     # one failed row keeps the others
    path.unlink(missing_ok=True)                      # 256 MB at a million items
    return row


def print_table(results: list[dict], args) -> None:
    base = results[0].get("events/s")      # the smallest catalogue (row_plan's order)
    print(f"\n| items | catalogue | ranking | events/s | x {results[0]['items']:,} items "
          f"| batch mean backlog / steady | offered/s | p50 ms | p99 ms | recall@10 | startup s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        recall_text = f"{r['recall@10']:.4f}" if "IVF" in r["ranking"] else "1 (exact)"
        if "error" in r:
            print(f"| {r['items']:,} | {r['catalogue']} | {r['ranking']} | failed: "
                  f"{r['error'].replace('|', '/')} |" + " |" * 7)
            continue
        means = " / ".join("-" if r.get(key) is None else format(r[key], ".1f")
                           for key in ("batch mean", "steady batch mean"))
        print(f"| {r['items']:,} | {r['catalogue']} | {r['ranking']} | {r['events/s']:,.0f} "
              f"| {r['events/s'] / base if base else float('nan'):.2f} "
              f"| {means} | {r['offered/s']:.0f} "
              f"| {r['p50 ms']:,.0f} | {r['p99 ms']:,.0f} | {recall_text} "
              f"| {r['startup s']:.1f} |")
    print(f"\nevents/s: a backlog of {args.events} clicks drained, first recommendation to "
          "last; p50/p99: produce to recommendation at the offered rate; batch mean: "
          "the worker's batch-size histogram (sum / count) over the backlog and over the "
          "steady clicks. Compare rows of this run only.")


if __name__ == "__main__":
    main()
