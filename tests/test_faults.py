"""Faults around the worker: the broker goes away and comes back."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import uuid

import pytest

from streams.shared.clients import produce_clicks
from streams.shared.config import TrainerConfig
from streams.shared.local_broker import BROKER_SH, free_ports
from streams.shared.model_updates import read_announcements
from streams.shared.topics import ensure_topics
from streams.trainer.trainer import run_trainer
from tests.test_stream_e2e import (Worker, assert_matches_offline, checkpoint,  # noqa: F401
                                   clicks_for, collect, offline_expectation)


class RestartableBroker:
    """infra/kafka/broker.sh on fixed ports and a data dir that outlives a stop."""

    def __init__(self, data_dir):
        port, controller = free_ports(2)
        self.env = dict(os.environ, KAFKA_PORT=str(port), KAFKA_CONTROLLER_PORT=str(controller),
                        KAFKA_DATA_DIR=str(data_dir))
        self.bootstrap = f"127.0.0.1:{port}"

    def run(self, action):
        done = subprocess.run(["bash", str(BROKER_SH), action], env=self.env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr


def test_worker_and_trainer_go_on_after_a_broker_restart(checkpoint, tmp_path, caplog):  # noqa: F811
    path, model = checkpoint
    caplog.set_level(logging.INFO, logger="streams.trainer.trainer")
    broker = RestartableBroker(tmp_path / "kafka")
    broker.run("start")
    name = uuid.uuid4().hex[:8]
    worker = Worker(broker.bootstrap, path, tmp_path, name)
    stop = threading.Event()
    trainer = threading.Thread(target=run_trainer, args=(TrainerConfig(
        broker=broker.bootstrap, interactions_topic=f"interactions-{name}", partitions=3,
        model_updates_topic=f"model-updates-{name}", group_id=f"trainer-{name}",
        checkpoint=str(path), model_store=str(tmp_path / "models"),
        buffer_dir=str(tmp_path / "buffer"), round_every_events=10 ** 9, round_every_s=2.0,
        steps=2, holdout_events=5, min_holdout=10 ** 6, threads=1, metrics_port=0), stop),
        daemon=True)
    # The worker serves only the checkpoint here: this test is about the connection.
    worker.args += ["--follow-model-updates", "false"]
    clicks = clicks_for(n_users=6, per_user=8, seed=4)
    try:
        worker.start()
        trainer.start()
        produce_clicks(broker.bootstrap, f"interactions-{name}", clicks[:24])
        collect(broker.bootstrap, f"recommendations-{name}", {c["event_id"] for c in clicks[:24]})
        broker.run("stop")
        time.sleep(5)                                   # both notice the broker is gone
        broker.run("start")
        versions_before = len(read_announcements(broker.bootstrap, f"model-updates-{name}"))
        produce_clicks(broker.bootstrap, f"interactions-{name}", clicks[24:])
        got = collect(broker.bootstrap, f"recommendations-{name}",
                      {c["event_id"] for c in clicks}, timeout=120)
        assert_matches_offline(got, offline_expectation(model, clicks))
        assert worker.process.poll() is None, worker.log_tail()
        deadline = time.monotonic() + 60                # the trainer consumes and publishes again
        while len(read_announcements(broker.bootstrap, f"model-updates-{name}")) <= versions_before:
            assert time.monotonic() < deadline, (
                f"no version after the restart; trainer alive: {trainer.is_alive()}, its log:\n"
                + "\n".join(r.getMessage() for r in caplog.records[-10:]))
            time.sleep(1)
        assert trainer.is_alive()
    finally:
        stop.set()
        worker.stop()
        trainer.join(30)
        broker.run("stop")


def test_a_trainer_killed_mid_round_announces_nothing_half_written(checkpoint, tmp_path):  # noqa: F811
    import signal
    import sys

    from streams.shared.local_broker import REPO
    from streams.shared.model_store import ModelStore

    path, _ = checkpoint
    broker = RestartableBroker(tmp_path / "kafka")
    broker.run("start")
    name, store = uuid.uuid4().hex[:8], ModelStore(tmp_path / "models")
    updates = f"model-updates-{name}"
    args = [sys.executable, "-m", "cli", "trainer", "--broker", broker.bootstrap,
            "--interactions-topic", f"interactions-{name}", "--partitions", "3",
            "--model-updates-topic", updates, "--group-id", f"trainer-{name}",
            "--checkpoint", str(path), "--model-store", str(store.root),
            "--buffer-dir", str(tmp_path / "buffer"), "--round-every-s", "0.2",
            "--steps", "15", "--holdout-events", "5", "--min-holdout", "1000000",
            "--threads", "1", "--metrics-port", "0"]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def start():
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "trainer.log", "ab"))

    def announced():
        return read_announcements(broker.bootstrap, updates)

    def wait_for_versions(n, timeout=90):
        deadline = time.monotonic() + timeout
        while len(announced()) < n:
            assert time.monotonic() < deadline, (tmp_path / "trainer.log").read_text()[-2000:]
            produce_clicks(broker.bootstrap, f"interactions-{name}",
                           clicks_for(n_users=6, per_user=2, seed=int(time.time() * 1e3) % 10 ** 6))
            time.sleep(0.5)

    ensure_topics(broker.bootstrap, {f"interactions-{name}": 3})     # as a worker would
    trainer = start()
    try:
        wait_for_versions(2)
        time.sleep(0.5)                                 # inside a round (rounds run back to back)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
        before = announced()
        for announcement in before:                     # everything announced loads and checks
            store.load(announcement)
        trainer = start()                               # goes on from the newest version
        wait_for_versions(len(before) + 1)
        after = announced()
        assert after[len(before)]["parent"] == before[-1]["version"]
        store.load(after[-1])
    finally:
        trainer.kill()
        broker.run("stop")


def test_a_trainer_session_timeout_kafka_refuses_is_refused_at_start_naming_the_option():
    from streams.shared.config import TrainerConfig
    from streams.trainer.trainer import run_trainer

    for bad in (1.0, 5000.0):
        with pytest.raises(ValueError, match=r"--session-timeout-s .*6 to 1800 s"):
            run_trainer(TrainerConfig(broker="127.0.0.1:1", session_timeout_s=bad))


def test_a_worker_whose_broker_is_gone_still_stops_on_sigterm(checkpoint, tmp_path):  # noqa: F811
    path, _ = checkpoint
    broker = RestartableBroker(tmp_path / "kafka")
    broker.run("start")
    name = uuid.uuid4().hex[:8]
    worker = Worker(broker.bootstrap, path, tmp_path, name)
    worker.args += ["--shutdown-timeout-s", "5"]
    clicks = clicks_for(n_users=3, per_user=3, seed=5)
    try:
        worker.start()
        produce_clicks(broker.bootstrap, f"interactions-{name}", clicks)
        collect(broker.bootstrap, f"recommendations-{name}", {c["event_id"] for c in clicks})
    finally:
        broker.run("stop")
    worker.process.terminate()
    started = time.monotonic()
    worker.process.wait(40)                             # raises TimeoutExpired if it hangs
    assert time.monotonic() - started < 30, worker.log_tail()
