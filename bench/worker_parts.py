"""The worker's per-click parts, each against what it replaced, in one process run.

- step + scores of a batch, eager against traced (model/traced.py), alone and with one busy
  Python thread beside it (as the worker's event loop is): the GIL hand-overs between eager
  tensor ops;
- decoding a click: the hand-written Avro reader against fastavro (schemas/codec.py);
- encoding a batch of recommendations: RecommendationWriter against dicts + fastavro;
- handing a fetched message to the agent's channel: Faust's conductor handler against the
  worker's (streams/worker/conductor.py), on the event loop, without a broker.

    .venv/bin/python bench/worker_parts.py [--model mlsa4rec-s] [--batch 256]

Random weights with ML-1M's 3,416 items (speed does not depend on training); one torch
thread. Ratios compare within one run only.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.models import build_model  # noqa: E402
from model.traced import traced_step  # noqa: E402
from schemas import codec  # noqa: E402

N_ITEMS = 3417


def per_call_ms(fn, seconds: float = 2.0) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return 1000 * (time.perf_counter() - start) / n


class BusyThread:
    """A Python thread that never waits: it hands the GIL over only when asked to."""

    def __enter__(self):
        self.stop = False
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()
        return self

    def _spin(self):
        x = 0
        while not self.stop:
            x += 1

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def step_rows(model_name: str, batch: int) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    model = build_model(model_name, N_ITEMS).eval()
    traced = traced_step(model)
    state = model.init_state(batch)
    items = torch.randint(1, N_ITEMS, (batch,))

    def eager():
        with torch.no_grad():
            new, user_repr = model.step({k: v.clone() for k, v in state.items()}, items)
            model.scores(user_repr)

    def graph():
        with torch.no_grad():
            traced({k: v.clone() for k, v in state.items()}, items)

    rows = [("alone", per_call_ms(eager), per_call_ms(graph))]
    with BusyThread():
        rows.append(("one busy Python thread beside it", per_call_ms(eager, 4.0),
                     per_call_ms(graph, 4.0)))
    return rows


def decode_us() -> tuple[float, float]:
    click = codec.encode_interaction({"event_id": "e-123456", "user_id": "user-4242",
                                      "item_id": "item-1193", "event_type": "CLICK",
                                      "timestamp": 1_700_000_000_000, "properties": None})
    fast = codec.AvroCodec("interaction", codec.PinnedSchemas())
    generic = codec.AvroCodec("interaction", codec.PinnedSchemas())
    generic._fast_body = None                           # fastavro for every message
    assert fast.decode(click) == generic.decode(click)
    n = 20000
    out = []
    for decoder in (fast.decode, generic.decode):
        start = time.perf_counter()
        for _ in range(n):
            decoder(click)
        out.append(1e6 * (time.perf_counter() - start) / n)
    return out[0], out[1]


def encode_ms(batch: int) -> tuple[float, float]:
    item_ids = ["[PAD]"] + [f"item-{i}" for i in range(1, N_ITEMS)]
    writer = codec.RecommendationWriter(item_ids)
    rng = np.random.default_rng(0)
    top = rng.integers(1, N_ITEMS, (batch, 10))
    scores = rng.standard_normal((batch, 10)).astype(np.float32)
    users = [f"user-{i}" for i in range(batch)]
    events = [f"e-{i}" for i in range(batch)]
    stamps = [1_700_000_000_000 + i for i in range(batch)]

    def with_writer():
        return writer.encode_batch(users, events, stamps, top, scores, "v1", 1_700_000_000_000)

    def with_dicts():
        return [codec.encode_recommendation({
            "user_id": users[r], "event_id": events[r], "event_timestamp": stamps[r],
            "items": [{"item_id": item_ids[i], "score": float(s), "rank": k + 1}
                      for k, (i, s) in enumerate(zip(top[r].tolist(), scores[r].tolist()))],
            "model_version": "v1", "produced_at": 1_700_000_000_000}) for r in range(batch)]

    assert with_writer() == with_dicts()
    return per_call_ms(with_writer), per_call_ms(with_dicts)


def conductor_us(n: int = 20000) -> tuple[float, float]:
    """us per message through the conductor (its `on_message`: the partition's handler
    looked up, then run) into the agent's channel, then taken out as the agent's reader
    does: Faust's conductor, and the worker's (streams/worker/conductor.py)."""
    import asyncio

    import faust
    from faust.transport import conductor as faust_conductor
    from faust.types.tuples import TP, ConsumerMessage

    from streams.worker.consumer import Transport

    async def run(fausts: bool) -> float:
        app = faust.App("worker-parts", broker="kafka://127.0.0.1:1")
        app.transport = Transport(app.conf.broker_consumer, app)
        app.flow_control.resume()
        channel = app.topic("clicks", key_type=bytes, value_type=bytes, key_serializer="raw",
                            value_serializer="raw").clone(is_iterator=True)
        tp = TP("clicks", 0)
        conductor = faust_conductor.Conductor(app) if fausts else app.topics
        conductor._tp_to_callback[tp] = conductor._build_handler(tp, {channel})
        on_message = conductor.on_message
        messages = [ConsumerMessage("clicks", 0, i, 0.0, 0, [], b"user-%d" % i, b"\x02click",
                                    None) for i in range(n)]
        queue = channel.queue
        start = time.perf_counter()
        for message in messages:
            await on_message(message)
            queue.get_nowait()
        return 1e6 * (time.perf_counter() - start) / n

    return asyncio.run(run(True)), asyncio.run(run(False))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlsa4rec-s")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"| {args.model} step + scores, batch {args.batch} | eager ms | traced ms | eager / traced |")
    print("|---|---|---|---|")
    for label, eager, graph in step_rows(args.model, args.batch):
        print(f"| {label} | {eager:.1f} | {graph:.1f} | {eager / graph:.1f} |")
    fast, generic = decode_us()
    print(f"\ndecode a click: hand-written reader {fast:.1f} us, fastavro {generic:.1f} us "
          f"({generic / fast:.1f}x)")
    writer, dicts = encode_ms(args.batch)
    print(f"encode {args.batch} recommendations of 10 items: RecommendationWriter {writer:.2f} ms, "
          f"dicts + fastavro {dicts:.2f} ms ({dicts / writer:.1f}x)")
    theirs, ours = conductor_us()
    print(f"a fetched message into the agent's channel: Faust's conductor {theirs:.1f} us, "
          f"the worker's {ours:.1f} us ({theirs / ours:.1f}x)")


if __name__ == "__main__":
    main()
