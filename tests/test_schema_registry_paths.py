"""Every other process of the product through a real Schema Registry, not only the worker.

tests/test_schema_registry_e2e.py covers `mlsa4rec worker` and `produce` with a real registry;
this file covers the rest with the same registry and one worker for the module:
`mlsa4rec replay` registers and sends the log's clicks, the worker scores them; the online
trainer reads clicks framed with registry ids by confluent-kafka's AvroSerializer (older and
newer schema versions) into its buffer; `mlsa4rec tail` and `evaluate-stream` decode the
worker's registry-framed recommendations. Bad input says what it gets: undecodable clicks are
refused (trainer) or counted with the first reason (evaluate-stream); a tail without the
registry, or any command whose registry cannot be reached, stops with the message and the
registry's address instead of a traceback, having sent or committed nothing it could not read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streams.shared.clients import PRODUCER_DEFAULTS
from streams.shared.local_broker import free_ports
from tests.test_schema_registry_e2e import (avro_serializer, confluent_avro,  # noqa: F401
                                            interaction_versions, read_decoded, registry_url,
                                            schema_id)
from tests.test_stream_e2e import (ITEM_IDS, PARTITIONS, REPO, Worker,  # noqa: F401
                                   assert_matches_offline, checkpoint, http_get, metric,
                                   offline_expectation)

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient  # noqa: E402
from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: E402

LOG_USERS, LOG_CLICKS = 4, 20           # the replayed log
SERIALIZER_USERS = 3                    # clicks from confluent-kafka's AvroSerializer
UNKNOWN_ID = b"\x00" + (999_999).to_bytes(4, "big")
BAD_CLICKS = [UNKNOWN_ID + b"\x02e\x02u\x02i\x00\x02\x00", b"not avro at all"]


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


def cli_process(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


def read_confluent(bootstrap, topic, client, want, timeout=60.0):
    """(schema id, record) of each message of `topic` that confluent-kafka's AvroDeserializer
    reads, from the start until `want` messages came; the ones it refuses are left out
    (read_decoded would stop at them)."""
    deserializer = confluent_avro.AvroDeserializer(client)
    ctx = SerializationContext(topic, MessageField.VALUE)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    read, out, deadline = 0, [], time.monotonic() + timeout
    try:
        while read < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            read += 1
            try:
                out.append((schema_id(msg.value()), deserializer(msg.value(), ctx)))
            except Exception:           # SerializationError, or no magic byte at all
                pass
    finally:
        consumer.close()
    return out


class Stream:
    """The module's topics after the setup: what was sent, and by whom."""

    def __init__(self, bootstrap, registry, name, worker, log_path):
        self.bootstrap, self.registry, self.name, self.worker = bootstrap, registry, name, worker
        self.clicks_topic, self.recs_topic = f"interactions-{name}", f"recommendations-{name}"
        self.log_path = log_path
        self.replayed: list[dict] = []      # as the replay sends them: event ids <stem>-<row>
        self.serialized: list[dict] = []    # sent with AvroSerializer, older/current/newer
        self.recommendations: list[tuple[int, dict]] = []   # (schema id, record), Confluent's reader

    @property
    def good(self):
        return self.replayed + self.serialized


@pytest.fixture(scope="module")
def stream(kafka_bootstrap_server, registry_url, checkpoint, tmp_path_factory):  # noqa: F811
    """One worker with the registry; the log replayed through `mlsa4rec replay` with the
    registry, then AvroSerializer clicks in three schema versions and two bad clicks."""
    tmp = tmp_path_factory.mktemp("registry-paths")
    name = uuid.uuid4().hex[:8]
    worker = Worker(kafka_bootstrap_server, checkpoint[0], tmp, name)
    worker.args += ["--schema-registry-url", registry_url, "--follow-model-updates", "false"]
    log_path = tmp / "log.csv"
    state = Stream(kafka_bootstrap_server, registry_url, name, worker, log_path)
    rows = [(f"log-u{n % LOG_USERS}", ITEM_IDS[1 + (7 * n) % (len(ITEM_IDS) - 1)], 1_700_000_000 + n)
            for n in range(LOG_CLICKS)]
    log_path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    state.replayed = [{"event_id": f"log-{n}", "user_id": u, "item_id": i, "event_type": "CLICK",
                       "timestamp": t * 1000, "properties": None} for n, (u, i, t) in enumerate(rows)]
    worker.start()
    try:
        worker.wait_ready()
        done = cli("replay", str(log_path), "--broker", kafka_bootstrap_server,
                   "--interactions-topic", state.clicks_topic, "--partitions", str(PARTITIONS),
                   "--schema-registry-url", registry_url, "--progress", "false",
                   "--progress-file", str(tmp / "replay-progress.json"))
        assert done.returncode == 0, done.stderr
        assert f"replayed {LOG_CLICKS} events" in done.stderr

        client = SchemaRegistryClient({"url": registry_url})
        versions = interaction_versions()
        labels = list(versions)
        serializers = {label: avro_serializer(client, schema) for label, schema in versions.items()}
        producer = Producer({"bootstrap.servers": kafka_bootstrap_server, **PRODUCER_DEFAULTS})
        ctx = SerializationContext(state.clicks_topic, MessageField.VALUE)
        for n in range(3 * SERIALIZER_USERS):
            user, label = f"ser-u{n % SERIALIZER_USERS}", labels[n // SERIALIZER_USERS]
            click = {"event_id": f"ser-{n}", "user_id": user, "item_id": ITEM_IDS[1 + (5 * n) % 29],
                     "event_type": "CLICK", "timestamp": 1_700_000_100_000 + n, "properties": None}
            record = {k: v for k, v in click.items() if k != "properties" or label != "older"}
            if label == "newer":
                record["session_id"] = f"session-{user}"
            producer.produce(state.clicks_topic, key=user.encode(), value=serializers[label](record, ctx))
            state.serialized.append(click)
        for value in BAD_CLICKS:
            producer.produce(state.clicks_topic, key=b"ser-u0", value=value)
        producer.flush(30)
        state.recommendations = read_decoded(kafka_bootstrap_server, state.recs_topic,
                                             confluent_avro.AvroDeserializer(client), len(state.good))
        yield state
    finally:
        worker.stop()


def test_a_replay_through_the_registry_is_scored_by_the_worker_using_it(stream, checkpoint):  # noqa: F811
    client = SchemaRegistryClient({"url": stream.registry})
    current = client.lookup_schema(f"{stream.clicks_topic}-value",
                                   Schema(json.dumps(interaction_versions()["current"]), "AVRO"))
    # The replay registered interaction.avsc under the topic's subject and framed every click
    # with that id: Confluent's reader decodes them as sent.
    sent = read_confluent(stream.bootstrap, stream.clicks_topic, client,
                          len(stream.good) + len(BAD_CLICKS))
    replayed = {record["event_id"]: (sid, record) for sid, record in sent
                if record["event_id"].startswith("log-")}
    assert len(replayed) == LOG_CLICKS
    for click in stream.replayed:
        sid, record = replayed[click["event_id"]]
        assert sid == current.schema_id
        assert (record["user_id"], record["item_id"]) == (click["user_id"], click["item_id"])
    got = {}
    for _, rec in stream.recommendations:
        got.setdefault(rec["event_id"], []).append(rec)
    assert_matches_offline(got, offline_expectation(checkpoint[1], stream.good))
    page = http_get(stream.worker.metrics_port, "/metrics")
    assert metric(page, 'mlsa4rec_events_total{outcome="applied"}') == len(stream.good)
    assert metric(page, 'mlsa4rec_events_total{outcome="dead_letter"}') == len(BAD_CLICKS)


def test_tail_and_evaluate_stream_decode_the_workers_registry_framed_recommendations(
        stream, tmp_path):
    n = len(stream.good)
    tail = cli_process("tail", "--broker", stream.bootstrap, "--recommendations-topic",
                       stream.recs_topic, "--schema-registry-url", stream.registry,
                       "--from-beginning", "--max", str(n), "--idle-timeout", "60")
    evaluation = cli("evaluate-stream", "--broker", stream.bootstrap, "--interactions-topic",
                     stream.clicks_topic, "--recommendations-topic", stream.recs_topic,
                     "--schema-registry-url", stream.registry, "--expect", str(n),
                     "--idle-timeout", "10", "--out", str(tmp_path / "report"))
    out, err = tail.communicate(timeout=120)
    assert tail.returncode == 0, err
    printed = {rec["event_id"]: rec for rec in map(json.loads, out.splitlines())}
    confluent = {rec["event_id"]: rec for _, rec in stream.recommendations}
    assert printed.keys() == confluent.keys() and len(printed) == n
    for event_id, rec in printed.items():
        assert rec["items"] == confluent[event_id]["items"], event_id
        assert rec["model_version"] == confluent[event_id]["model_version"] == "test-v1"

    assert evaluation.returncode == 0, evaluation.stderr
    summary = json.loads((tmp_path / "report" / "evaluation.json").read_text())["summary"]
    # Every click of the three schema versions is read; each user's last one has no next click.
    assert summary["interactions"] == n and summary["recommendations"] == n
    assert summary["judged"] == n - LOG_USERS - SERIALIZER_USERS
    # The two bad clicks are counted, and the first one's reason is said.
    assert summary["undecodable"] == len(BAD_CLICKS)
    assert (f"{stream.clicks_topic} partition" in evaluation.stdout
            and "unknown schema id 999999" in evaluation.stdout), evaluation.stdout


def test_the_trainer_reads_registry_framed_clicks_into_its_buffer_and_refuses_bad_ones(
        stream, checkpoint, tmp_path):  # noqa: F811
    from streams.trainer.replay_buffer import ReplayBuffer

    (port,) = free_ports(1)
    buffer_dir = tmp_path / "buffer"
    trainer = cli_process("trainer", "--broker", stream.bootstrap, "--interactions-topic",
                          stream.clicks_topic, "--partitions", str(PARTITIONS),
                          "--model-updates-topic", f"trainer-updates-{stream.name}",
                          "--group-id", f"trainer-{stream.name}", "--checkpoint", str(checkpoint[0]),
                          "--model-store", str(tmp_path / "models"), "--buffer-dir", str(buffer_dir),
                          "--round-every-events", "1000000000", "--round-every-s", "1000000",
                          "--threads", "1", "--metrics-port", str(port),
                          "--schema-registry-url", stream.registry)
    events = 'mlsa4rec_trainer_events_total'
    refused = 'mlsa4rec_trainer_skipped_total{reason="refused"}'
    try:
        deadline, page = time.monotonic() + 90, ""
        while True:
            try:
                page = http_get(port, "/metrics")
                if metric(page, events) + metric(page, refused) >= len(stream.good) + len(BAD_CLICKS):
                    break
            except (OSError, AssertionError):
                pass                    # not up yet, or no refusal counted yet
            assert trainer.poll() is None, trainer.communicate()[1][-3000:]
            assert time.monotonic() < deadline, page
            time.sleep(0.5)
        assert metric(page, events) == len(stream.good)
        assert metric(page, refused) == len(BAD_CLICKS)
    finally:
        trainer.send_signal(signal.SIGTERM)        # a clean stop: the buffer is closed
        trainer.communicate(timeout=60)
    buffer = ReplayBuffer(buffer_dir)
    try:
        for click in stream.good:
            user = click["user_id"]
            assert buffer.sequence(user) == [c["item_id"] for c in stream.good if c["user_id"] == user]
    finally:
        buffer.close()


def test_a_tail_without_the_registry_says_which_message_it_cannot_read(stream):
    from schemas.codec import PinnedSchemas

    if {sid for sid, _ in stream.recommendations} == {PinnedSchemas().current_id("Recommendation")}:
        pytest.skip("this registry gave Recommendation the id ids.json pins for it")
    done = cli("tail", "--broker", stream.bootstrap, "--recommendations-topic", stream.recs_topic,
               "--from-beginning", "--max", "1", "--idle-timeout", "30")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert f"mlsa4rec tail: {stream.recs_topic} partition" in done.stderr, done.stderr
    assert "--schema-registry-url" in done.stderr


def test_commands_whose_registry_cannot_be_reached_stop_saying_so_and_lose_nothing(
        stream, checkpoint, tmp_path):  # noqa: F811
    (closed,) = free_ports(1)
    nowhere = f"http://127.0.0.1:{closed}"
    env = {"MLSA4REC_SCHEMA_REGISTRY_MAX_RETRIES": "0"}
    fresh_topic = f"interactions-{stream.name}-unsent"
    group = f"trainer-unreachable-{stream.name}"
    clicks_file = tmp_path / "clicks.jsonl"
    clicks_file.write_text(json.dumps({"user_id": "u", "item_id": ITEM_IDS[1]}) + "\n")
    progress = tmp_path / "progress.json"
    runs = {
        "replay": cli_process("replay", str(stream.log_path), "--broker", stream.bootstrap,
                              "--interactions-topic", fresh_topic, "--partitions", "1",
                              "--schema-registry-url", nowhere, "--progress", "false",
                              "--progress-file", str(progress), env=env),
        "produce": cli_process("produce", str(clicks_file), "--broker", stream.bootstrap,
                               "--interactions-topic", fresh_topic,
                               "--schema-registry-url", nowhere, env=env),
        "tail": cli_process("tail", "--broker", stream.bootstrap, "--recommendations-topic",
                            stream.recs_topic, "--schema-registry-url", nowhere,
                            "--from-beginning", "--max", "1", "--idle-timeout", "30", env=env),
        "evaluate-stream": cli_process("evaluate-stream", "--broker", stream.bootstrap,
                                       "--interactions-topic", stream.clicks_topic,
                                       "--recommendations-topic", stream.recs_topic,
                                       "--schema-registry-url", nowhere, "--idle-timeout", "30",
                                       "--out", str(tmp_path / "report"), env=env),
        "trainer": cli_process("trainer", "--broker", stream.bootstrap, "--interactions-topic",
                               stream.clicks_topic, "--partitions", str(PARTITIONS),
                               "--model-updates-topic", f"trainer-updates-{stream.name}-2",
                               "--group-id", group, "--checkpoint", str(checkpoint[0]),
                               "--model-store", str(tmp_path / "models"),
                               "--buffer-dir", str(tmp_path / "buffer"), "--threads", "1",
                               "--metrics-port", "0", "--schema-registry-url", nowhere, env=env),
    }
    try:
        results = {command: process.communicate(timeout=120) for command, process in runs.items()}
    finally:
        for process in runs.values():
            if process.poll() is None:
                process.kill()
    for command, (_, err) in results.items():
        assert runs[command].returncode not in (0, None), (command, err)
        assert "Traceback" not in err, (command, err[-3000:])
        assert f"mlsa4rec {command}: schema registry {nowhere}: " in err, (command, err[-3000:])
    assert "cannot register mlsa4rec.Interaction under " + fresh_topic + "-value" in results["replay"][1]
    assert "cannot register mlsa4rec.Interaction" in results["produce"][1]
    for reader in ("tail", "evaluate-stream", "trainer"):
        assert "cannot fetch schema id" in results[reader][1], results[reader][1][-3000:]

    # Nothing was sent that no registry vouches for, and the trainer committed no click it
    # could not read: a restart with the registry back reads them all.
    if progress.exists():
        assert json.loads(progress.read_text())["delivered"] == 0
    probe = Consumer({"bootstrap.servers": stream.bootstrap, "group.id": group,
                      "enable.auto.commit": False})
    try:
        committed = probe.committed([TopicPartition(stream.clicks_topic, p) for p in range(PARTITIONS)],
                                    timeout=30)
        assert all(tp.offset < 0 for tp in committed), committed     # none: OFFSET_INVALID
        low_high = [probe.get_watermark_offsets(TopicPartition(fresh_topic, 0), timeout=30)]
    finally:
        probe.close()
    assert low_high == [(0, 0)]
