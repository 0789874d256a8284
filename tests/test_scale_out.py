"""Scale-out on the real broker: two scorer workers in one group share the input partitions.

Kafka assigns the partitions; a worker that gets a partition restores that partition's user
states from the table's changelog topic before it scores, and gives it back on a rebalance.
The check is the one of an uninterrupted single worker: every click's recommendations equal
the offline model stepped over that user's clicks (so no click was skipped, and a click scored
twice was scored from the same state, giving the same recommendation).
"""

from __future__ import annotations

import json
import time
import uuid

from streams.shared.clients import produce_clicks
from tests.test_stream_e2e import (Worker, assert_matches_offline, checkpoint,  # noqa: F401
                                   clicks_for, collect, http_get, metric, offline_expectation)


def applied(worker: Worker) -> float:
    return metric(http_get(worker.metrics_port, "/metrics"),
                  'mlsa4rec_events_total{outcome="applied"}')


def wait_healthy(worker: Worker, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(http_get(worker.metrics_port, "/health"))["status"] == "ok":
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"worker not healthy after {timeout} s:\n{worker.log_tail()}")


def test_a_second_worker_takes_partitions_with_their_states_and_gives_them_back(
        kafka_bootstrap_server, checkpoint, tmp_path):
    path, model = checkpoint
    name = uuid.uuid4().hex[:8]
    first, second = (Worker(kafka_bootstrap_server, path, tmp_path / label, name)
                     for label in ("first", "second"))
    for label in ("first", "second"):
        (tmp_path / label).mkdir()
    clicks = clicks_for(n_users=12, per_user=9, seed=4)
    thirds = [clicks[:36], clicks[36:72], clicks[72:]]
    topic_in, topic_out = f"interactions-{name}", f"recommendations-{name}"
    first.start()
    try:
        produce_clicks(kafka_bootstrap_server, topic_in, thirds[0])
        collect(kafka_bootstrap_server, topic_out, {c["event_id"] for c in thirds[0]})

        second.start()                      # joins the group: the partitions are shared out
        wait_healthy(second)
        produce_clicks(kafka_bootstrap_server, topic_in, thirds[1])
        collect(kafka_bootstrap_server, topic_out, {c["event_id"] for c in clicks[:72]})
        assert applied(second) > 0, "the second worker scored nothing:\n" + second.log_tail()

        second.stop()                       # leaves the group: its partitions go back
        produce_clicks(kafka_bootstrap_server, topic_in, thirds[2])
        got = collect(kafka_bootstrap_server, topic_out, {c["event_id"] for c in clicks})
        assert_matches_offline(got, offline_expectation(model, clicks))
    finally:
        second.stop()
        first.stop()
