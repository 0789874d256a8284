"""Replay, prequential evaluation of the live stream, and the report.

The end-to-end test replays a user log through a real worker and checks that what
`evaluate-stream` computes from Kafka equals the offline computation over the same events.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition

from model.prequential import metrics_at, next_item_ranks
from streams.replay.evaluation import StreamEvaluator, run_evaluate_stream
from streams.replay.log_replay import ReplayConfig, log_events, replay
from streams.replay.report import write_report
from tests.test_stream_e2e import ITEM_IDS, N_ITEMS, Worker, checkpoint  # noqa: F401 (fixture)


def rec(event_id, items, version="v1", at=1000):
    return {"event_id": event_id, "items": [{"item_id": i} for i in items],
            "model_version": version, "produced_at": at}


def test_each_recommendation_is_judged_by_the_users_next_click_in_any_arrival_order():
    ev = StreamEvaluator()
    ev.on_recommendation(rec("a1", ["x", "y", "z"], at=1100))      # before its click arrives
    ev.on_interaction("a", "p", "a1", 1000)
    ev.on_interaction("b", "q", "b1", 1000)
    ev.on_recommendation(rec("b1", ["w"], at=1050))
    ev.on_interaction("a", "y", "a2", 1200)                        # judges a1: rank 2
    ev.on_recommendation(rec("a1", ["x"], at=1300))                # duplicate: ignored
    ev.on_interaction("a", "y", "a2", 1200)                        # resent click: ignored
    ev.on_interaction("b", "nope", "b2", 1300)                     # judges b1: miss
    ev.on_recommendation(rec("a2", ["y"], version="v2", at=1250))  # a's last: not judged
    ev.flush_latencies()
    assert [(j.rank, j.version) for j in ev.judged] == [(2, "v1"), (0, "v1")]
    summary = ev.summary()
    assert summary["judged"] == 2 and summary["duplicates_ignored"] == 2
    assert summary["metrics"]["hr@10"] == 0.5
    assert summary["metrics"]["ndcg@10"] == pytest.approx(0.5 / np.log2(3))
    assert sorted(ev.latencies_ms) == [50, 50, 100]
    assert set(summary["by_version"]) == {"v1"}
    assert summary["last_per_user"]["users"] == 2 and summary["last_per_user"]["hr@10"] == 0.5


def test_judgments_are_also_counted_by_the_group_of_the_user_and_the_item_that_judged_them():
    from streams.demo import NEW_TITLES, NEW_USERS, THE_REST, groups

    group_of = groups(known_items={"x", "y"}, known_users={"a"})
    ev = StreamEvaluator(group_of=group_of)
    for user, item, event_id in [("a", "x", "a1"), ("a", "new", "a2"), ("a", "y", "a3"),
                                 ("b", "x", "b1"), ("b", "y", "b2")]:
        ev.on_interaction(user, item, event_id, 1000)
        ev.on_recommendation(rec(event_id, ["y", "x"]))
    by_group = ev.summary()["by_group"]
    # a1 is judged by a new title (a miss: it cannot be ranked), a2 by a known item for a known
    # user (rank 1), b1 by a known item for a user with no click before the cut-off (rank 1).
    assert {g: (s["judged"], s["hr@10"]) for g, s in by_group.items()} == {
        NEW_TITLES: (1, 0.0), THE_REST: (1, 1.0), NEW_USERS: (1, 1.0)}
    assert StreamEvaluator().summary()["by_group"] == {}        # no group_of: no groups


def write_log(path, n_users=6, per_user=9, seed=3):
    """A user log whose timestamps interleave users and repeat (ties keep file order)."""
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,timestamp"]
    for step in range(per_user):
        for u in range(n_users):
            lines.append(f"u{u},{ITEM_IDS[rng.integers(1, N_ITEMS)]},{1000 + step * 10 + u % 2}")
    lines.append("u0,brand-new-item,5000")                          # unknown to the model
    lines.append("u0,movie-3,5001")
    path.write_text("\n".join(lines) + "\n")
    return path


def count_messages(bootstrap, topic, partitions):
    """Messages ever written to the topic: the sum of its partitions' end offsets."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex})
    total = sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions))
    consumer.close()
    return total


def test_replay_is_time_ordered_and_resumable(kafka_bootstrap_server, tmp_path):
    log = write_log(tmp_path / "log.csv")
    events = log_events(str(log))
    assert list(np.diff(events.timestamps) >= 0) == [True] * (len(events.rows) - 1)
    ties = [r for r, t in zip(events.rows, events.timestamps) if t == 1000]
    assert ties == sorted(ties)                                     # file order on ties
    topic = f"replay-{uuid.uuid4().hex[:8]}"
    cfg = ReplayConfig(broker=kafka_bootstrap_server, interactions_topic=topic, partitions=2,
                       progress_file=str(tmp_path / "progress.json"), progress=False)
    # A first run that stopped after 20 delivered events, as its progress file says.
    (tmp_path / "progress.json").write_text(
        f'{{"source": "{log}", "topic": "{topic}", "k_core": 0, "start": "", '
        f'"events": {len(events.rows)}, "delivered": 20}}')
    assert replay(str(log), cfg) == len(events.rows) - 20
    assert replay(str(log), cfg) == 0                               # finished: nothing again
    assert count_messages(kafka_bootstrap_server, topic, 2) == len(events.rows) - 20
    later = log_events(str(log), start="1040")
    assert later.timestamps.min() >= 1040 and len(later.rows) < len(events.rows)


def test_a_replay_with_max_rate_spreads_the_logs_bursts_out(kafka_bootstrap_server, tmp_path):
    log = write_log(tmp_path / "log.csv")               # 56 events, 6 in each log second
    topic = f"paced-{uuid.uuid4().hex[:8]}"
    cfg = ReplayConfig(broker=kafka_bootstrap_server, interactions_topic=topic, partitions=1,
                       progress_file=str(tmp_path / "progress.json"), progress=False,
                       max_rate=200.0)                  # flat out, but paced
    assert replay(str(log), cfg) == 56
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap_server, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    sent_ms = []
    deadline = time.monotonic() + 60
    while len(sent_ms) < 56 and time.monotonic() < deadline:
        sent_ms += [m.timestamp()[1] for m in consumer.consume(100, 1.0) if not m.error()]
    consumer.close()
    # Flat out they would go in a few ms; paced, 56 events take at least 55 x 5 ms.
    assert len(sent_ms) == 56 and max(sent_ms) - min(sent_ms) >= 55 * 5 - 2


def test_a_pause_before_an_event_moves_the_logs_schedule_on_without_a_burst_after_it(
        kafka_bootstrap_server, tmp_path, monkeypatch):
    """The demo's replay waits for the trainer's rounds (before_send): the events after a
    pause keep their spacing, as if the log had paused, instead of going at once to catch up."""
    import streams.replay.log_replay

    log = write_log(tmp_path / "log.csv")
    n_events = len(log_events(str(log)).rows)

    def waits_of(pause_at):
        clock, waits = [0.0], []

        def sleep(seconds):
            waits.append(round(seconds, 6))
            clock[0] += seconds

        def before_send(sent):
            if sent != pause_at:
                return 0.0
            clock[0] += 100.0                  # the trainer's round, on the replay's clock
            return 100.0

        monkeypatch.setattr(streams.replay.log_replay, "time",
                            SimpleNamespace(sleep=sleep, monotonic=lambda: clock[0]))
        cfg = ReplayConfig(broker=kafka_bootstrap_server, progress=False, speed=10.0,
                           interactions_topic=f"paused-{uuid.uuid4().hex[:8]}", partitions=1,
                           progress_file=str(tmp_path / f"progress-{pause_at}.json"))
        assert replay(str(log), cfg, before_send) == n_events
        return waits

    unpaused, paused = waits_of(-1), waits_of(20)
    assert len(unpaused) > 5 and paused == unpaused     # the same waits between events


def test_an_interrupted_replay_records_what_it_sent_and_the_next_run_sends_the_rest_once(
        kafka_bootstrap_server, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a chunk (here while a time-scaled replay waits): what was sent
    is delivered and recorded, so the next run sends each event exactly once in all."""
    import streams.replay.log_replay

    log = write_log(tmp_path / "log.csv")
    n_events = len(log_events(str(log)).rows)
    topic = f"replay-{uuid.uuid4().hex[:8]}"
    cfg = ReplayConfig(broker=kafka_bootstrap_server, interactions_topic=topic, partitions=2,
                       progress_file=str(tmp_path / "progress.json"), progress=False, speed=1.0)
    waits = []

    def interrupted_sleep(seconds):
        waits.append(seconds)
        if len(waits) == 3:
            raise KeyboardInterrupt

    # replay's own clock only (topic creation polls time.sleep too)
    monkeypatch.setattr(streams.replay.log_replay, "time",
                        SimpleNamespace(sleep=interrupted_sleep, monotonic=time.monotonic))
    with pytest.raises(KeyboardInterrupt):
        replay(str(log), cfg)
    first = json.loads((tmp_path / "progress.json").read_text())["delivered"]
    assert 0 < first < n_events
    assert count_messages(kafka_bootstrap_server, topic, 2) == first

    cfg.speed = 0.0
    assert replay(str(log), cfg) == n_events - first
    assert count_messages(kafka_bootstrap_server, topic, 2) == n_events


def test_stream_evaluation_equals_the_offline_computation_and_the_report_renders(
        kafka_bootstrap_server, checkpoint, tmp_path):  # noqa: F811
    path, model = checkpoint
    name = uuid.uuid4().hex[:8]
    log = write_log(tmp_path / "log.csv", n_users=8, per_user=12)
    worker = Worker(kafka_bootstrap_server, path, tmp_path, name)
    worker.start()
    try:
        sent = replay(str(log), ReplayConfig(
            broker=kafka_bootstrap_server, interactions_topic=f"interactions-{name}",
            partitions=3, progress_file=str(tmp_path / "p.json"), progress=False))
        result = run_evaluate_stream(kafka_bootstrap_server, f"interactions-{name}",
                                     f"recommendations-{name}", tmp_path / "report",
                                     idle_timeout_s=20, expect_recommendations=sent,
                                     log=lambda line: None)
    finally:
        worker.stop()
    summary = result["summary"]
    assert summary["recommendations"] == sent, worker.log_tail()

    # Offline: the same model over each user's events in log order, judged the same way.
    events = log_events(str(log))
    index = {raw: i for i, raw in enumerate(ITEM_IDS)}
    sequences = {}
    for user, item in zip(events.users, events.items):
        sequences.setdefault(user, []).append(index.get(item, -1))
    ranks = next_item_ranks(model, [np.array(s) for s in sequences.values()])
    offline_ranks = np.concatenate(ranks)
    offline_ranks[offline_ranks > 10] = 0                          # the stream sends a top 10
    offline = metrics_at(offline_ranks, (5, 10))
    assert summary["judged"] == len(offline_ranks)
    for metric, value in offline.items():
        assert summary["metrics"][metric] == pytest.approx(value, abs=1e-9), metric
    # ... and click by click: each judgment names the user and the click it followed, which
    # the offline side ranks the same (what the demo's paired differences rest on).
    ranks_of = dict(zip(sequences, ranks))
    assert [j.rank for j in result["judged"]] == [
        int(ranks_of[j.user][j.n - 1]) if ranks_of[j.user][j.n - 1] <= 10 else 0
        for j in result["judged"]]
    assert summary["latency_ms"]["p50"] > 0

    page = write_report(result, tmp_path / "report", title="test replay", offline=offline)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3 and "test replay" in text
    for png in ("metrics.png", "latency.png", "throughput.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000
    check_in_browser(page, tmp_path)


def check_in_browser(page, tmp_path):
    """Open the report in headless Chromium, as a user would, offline."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium) - report not opened")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--disable-extensions", "--disable-background-networking",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert "Final numbers" in dom.stdout and dom.stdout.count("<img") == 3, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1100,2400",
                    page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image
    image = Image.open(shot).convert("L")
    assert image.size == (1100, 2400)
    assert sum(1 for n in image.histogram() if n) > 50   # charts drawn, not a blank page
