"""Live model swaps on the real broker: the trainer publishes, the scorer follows it between
batches, and a corrupt or out-of-store version is refused while the old one keeps serving."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid

import pytest

from streams.shared.clients import produce_clicks
from streams.shared.config import TrainerConfig
from streams.shared.model_updates import announce, ensure_model_updates_topic, read_announcements
from streams.trainer.trainer import run_trainer
from tests.test_stream_e2e import Worker, checkpoint, clicks_for, collect  # noqa: F401 (fixture)


def versions_of(bootstrap, name, clicks):
    got = collect(bootstrap, f"recommendations-{name}", {c["event_id"] for c in clicks})
    return {rec["model_version"] for c in clicks for rec in got.get(c["event_id"], [])}


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_scorer_swaps_to_trained_versions_and_refuses_bad_ones(
        kafka_bootstrap_server, checkpoint, tmp_path):
    path, _ = checkpoint
    bootstrap, name = kafka_bootstrap_server, uuid.uuid4().hex[:8]
    updates = f"model-updates-{name}"
    worker = Worker(bootstrap, path, tmp_path, name)
    worker.start()
    stop = threading.Event()
    trainer = threading.Thread(target=run_trainer, args=(TrainerConfig(
        broker=bootstrap, interactions_topic=f"interactions-{name}", partitions=3,
        model_updates_topic=updates, group_id=f"trainer-{name}", checkpoint=str(path),
        model_store=str(tmp_path / "models"), buffer_dir=str(tmp_path / "buffer"),
        round_every_events=30, round_every_s=1.0, steps=5, holdout_events=5, min_holdout=10 ** 6,
        threads=1),
        stop), daemon=True)
    try:
        first = clicks_for(n_users=5, per_user=4, seed=1)
        produce_clicks(bootstrap, f"interactions-{name}", first)
        assert versions_of(bootstrap, name, first) == {"test-v1"}, worker.log_tail()

        trainer.start()                 # announces the checkpoint, then fine-tunes from it
        wait_for(lambda: len(read_announcements(bootstrap, updates)) >= 2, 90, "a trained version")
        stop.set()
        trainer.join(30)
        announced = read_announcements(bootstrap, updates)
        trained = announced[-1]
        assert trained["parent"] == announced[-2]["version"]

        def serves(version):
            probe = clicks_for(n_users=3, per_user=1, seed=int(time.time() * 1000) % 10 ** 6)
            produce_clicks(bootstrap, f"interactions-{name}", probe)
            return versions_of(bootstrap, name, probe) == {version}
        wait_for(lambda: serves(trained["version"]), 60, "the scorer to serve the trained version")

        # A version whose file was altered after its sha256 was taken, and one outside the store.
        good = (tmp_path / "models" / trained["path"]).read_bytes()
        (tmp_path / "models" / "corrupt.pt").write_bytes(good[:-100] + b"\0" * 100)
        (tmp_path / "outside.pt").write_bytes(good)
        sha = hashlib.sha256(good).hexdigest()
        for version, file in (("corrupt-1", "corrupt.pt"), ("escape-1", "../outside.pt")):
            announce(bootstrap, updates, {**trained, "version": version, "path": file,
                                          "sha256": sha, "parent": trained["version"]})
        wait_for(lambda: "refused model version escape-1" in worker.log.read_text(), 30,
                 "the refusals in the worker's log")
        log = worker.log.read_text()
        assert "refused model version corrupt-1" in log and "sha256" in log
        assert "outside the model store" in log
        last = clicks_for(n_users=4, per_user=2, seed=99)
        produce_clicks(bootstrap, f"interactions-{name}", last)
        assert versions_of(bootstrap, name, last) == {trained["version"]}, worker.log_tail()
        assert worker.process.poll() is None
    finally:
        stop.set()
        worker.stop()


def test_a_trainer_that_cannot_load_any_announced_version_does_not_roll_back(
        kafka_bootstrap_server, checkpoint, tmp_path):
    """The store is unreachable or emptied: announcing the start checkpoint again would send
    every scorer back to it. The trainer stops with the reason instead."""
    path, _ = checkpoint
    name = uuid.uuid4().hex[:8]
    updates = f"model-updates-{name}"
    ensure_model_updates_topic(kafka_bootstrap_server, updates, 1)
    announce(kafka_bootstrap_server, updates, {"version": "v7", "path": "v7.pt",
                                               "sha256": "0" * 64, "parent": "v6"})
    cfg = TrainerConfig(broker=kafka_bootstrap_server, interactions_topic=f"interactions-{name}",
                        partitions=1, model_updates_topic=updates, group_id=f"trainer-{name}",
                        checkpoint=str(path), model_store=str(tmp_path / "models"),
                        buffer_dir=str(tmp_path / "buffer"), threads=1)
    stop = threading.Event()
    threading.Timer(30, stop.set).start()       # without the refusal it would consume on
    with pytest.raises(RuntimeError, match="refusing to announce"):
        run_trainer(cfg, stop)
    stop.set()
    assert [a["version"] for a in read_announcements(kafka_bootstrap_server, updates)] == ["v7"]


def test_a_worker_starts_on_the_newest_announced_version_that_loads(
        kafka_bootstrap_server, checkpoint, tmp_path):
    """A restarted worker serves the fleet's version from its first batch, not --checkpoint
    until its watcher catches up (which also rebuilt every state twice)."""
    from model.checkpoint import load_checkpoint
    from streams.worker.app import starting_model
    from streams.shared.config import StreamConfig
    from streams.shared.model_store import ModelStore

    path, _ = checkpoint
    name = uuid.uuid4().hex[:8]
    updates = f"model-updates-{name}"
    store = ModelStore(tmp_path / "models")
    model, payload = load_checkpoint(path)
    cfg = StreamConfig(broker=kafka_bootstrap_server, model_updates_topic=updates,
                       model_store=str(tmp_path / "models"), checkpoint=str(path))
    ensure_model_updates_topic(kafka_bootstrap_server, updates, 1)
    assert starting_model(cfg, "cpu")[1]["version"] == "test-v1"      # nothing announced yet

    first = store.publish(model, payload["item_ids"], {}, parent="test-v1")
    second = store.publish(model, payload["item_ids"], {}, parent=first["version"])
    for announcement in (first, second, {**second, "version": "broken", "sha256": "0" * 64}):
        announce(kafka_bootstrap_server, updates, announcement)
    assert starting_model(cfg, "cpu")[1]["version"] == second["version"]   # newest that loads

    cfg.follow_model_updates = False
    assert starting_model(cfg, "cpu")[1]["version"] == "test-v1"

    cfg.follow_model_updates, cfg.model_store = True, str(tmp_path / "emptied")
    assert starting_model(cfg, "cpu")[1]["version"] == "test-v1"      # none loads: logged
