"""Prometheus metrics and a health endpoint for the worker and the trainer.

Each process serves, on its own port (`--metrics-port`, 0 = off):
  GET /metrics   the Prometheus text format
  GET /health    200 {"status": "ok", ...} when it is serving, 503 {"status": "starting"} before
Metric names start with `mlsa4rec_`; infra/grafana/mlsa4rec.json charts them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


def directory_bytes(path: str | Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass                        # RocksDB removed it meanwhile
    return total


class WorkerMetrics:
    def __init__(self, data_dir: str | Path):
        self.registry = r = CollectorRegistry()
        self.events = Counter("mlsa4rec_events", "Clicks handled, by outcome", ["outcome"],
                              registry=r)
        self.batch_size = Histogram("mlsa4rec_batch_size", "Clicks per model batch",
                                    # fine near the usual --batch-max values: is a
                                    # batch full under a backlog?
                                    buckets=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192,
                                             224, 255, 256, 384, 511, 512, 1024),
                                    registry=r)
        self.step_seconds = Histogram("mlsa4rec_step_seconds",
                                      "Model-thread time per batch (step, top-k, serialise)",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram(
            "mlsa4rec_end_to_end_seconds",
            "Click's Kafka timestamp -> its recommendation acknowledged by the broker",
            buckets=LATENCY_BUCKETS, registry=r)
        self.consumer_lag = Gauge("mlsa4rec_consumer_lag", "Clicks not yet handled, per partition",
                                  ["partition"], registry=r)
        self.model_version = Gauge("mlsa4rec_model_version", "1 for the version being served",
                                   ["version"], registry=r)
        self.unknown_items = Counter("mlsa4rec_unknown_items",
                                     "Clicks on items the serving model does not know "
                                     "(left out of what it reads)",
                                     registry=r)
        self.model_swaps = Counter("mlsa4rec_model_swaps", "Model versions swapped in", registry=r)
        self.model_refused = Counter("mlsa4rec_model_refused", "Announced versions refused",
                                     registry=r)
        self.flushes = Counter("mlsa4rec_state_flushes", "State cache flushes written to the table",
                               registry=r)
        self.flushed_bytes = Counter(
            "mlsa4rec_state_flushed_bytes",
            "Bytes (keys + values) the flushes wrote to the table, and so to its changelog",
            registry=r)
        self.flushed_users = Counter("mlsa4rec_state_flushed_users", "User records flushed",
                                     registry=r)
        self.snapshots = Counter("mlsa4rec_state_snapshots", "State snapshots flushed", registry=r)
        self.cache_misses = Counter("mlsa4rec_state_cache_misses",
                                    "Users read from the table (not in the state cache)", registry=r)
        self.cache_users = Gauge("mlsa4rec_state_cache_users", "Users in the state cache",
                                 registry=r)
        state_bytes = Gauge("mlsa4rec_state_store_bytes", "Bytes of the RocksDB tables on disk",
                            registry=r)
        state_bytes.set_function(lambda: directory_bytes(data_dir))

    def serving(self, version: str, previous: str | None = None) -> None:
        if previous is not None:
            self.model_version.remove(previous)
        self.model_version.labels(version).set(1)


class TrainerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.events = Counter("mlsa4rec_trainer_events", "Clicks added to the replay buffer",
                              registry=r)
        self.skipped = Counter("mlsa4rec_trainer_skipped",
                               "Clicks the trainer did not keep: refused (the scorer "
                               "dead-letters them), vocabulary_full or duplicate",
                               ["reason"], registry=r)
        self.rounds = Counter("mlsa4rec_trainer_rounds", "Fine-tuning rounds, by outcome",
                              ["outcome"], registry=r)
        self.round_seconds = Histogram("mlsa4rec_trainer_round_seconds", "Time per round",
                                       buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300), registry=r)
        self.holdout_ndcg = Gauge("mlsa4rec_trainer_holdout_ndcg10",
                                  "Holdout NDCG@10 of the last round", ["model"], registry=r)
        self.model_version = Gauge("mlsa4rec_model_version", "1 for the version being served",
                                   ["version"], registry=r)


class MetricsServer:
    """/metrics and /health on a daemon thread; health() -> (ok, details dict);
    handle(target, headers) -> (status, headers, body) or None: any other GET (the worker's
    recommendations endpoint, streams/worker/queries.py), answered where it returns one."""

    def __init__(self, port: int, registry: CollectorRegistry, health, handle=None):
        registry_, health_, handle_ = registry, health, handle

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive: a client asking many times pays one connection (and one thread).
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # Headers and body leave in two writes: with Nagle's algorithm the second
                # waits for the client's delayed ACK, ~40 ms per answer on a kept-alive
                # connection (measured: bench/query_latency.py).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):  # noqa: N802 - http.server's name
                path, extra = self.path.split("?")[0], {}
                if path == "/metrics":
                    body, status, kind = generate_latest(registry_), 200, CONTENT_TYPE_LATEST
                elif path == "/health":
                    ok, details = health_()
                    # details may say why it is not ok in its own "status"
                    body = json.dumps({"status": "ok" if ok else "starting", **details}).encode()
                    status, kind = (200 if ok else 503), "application/json"
                else:
                    answer = handle_(self.path, self.headers) if handle_ else None
                    if answer is None:
                        body, status, kind = b"not found\n", 404, "text/plain"
                    else:
                        (status, extra, body), kind = answer, "application/json"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):       # no access log lines
                pass

        self.server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                       daemon=True)

    def start(self) -> "MetricsServer":
        self.thread.start()
        log.info("metrics and health on port %d", self.port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
