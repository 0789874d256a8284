"""Round trips against a real broker (see tests/kafka_broker.py): confluent-kafka,
aiokafka (what Faust uses underneath) and a tiny Faust worker with a RocksDB table."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import defaultdict

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from tests.kafka_broker import create_topics

N_MESSAGES = 100
KEYS = [f"user-{i}" for i in range(7)]


def _messages():
    # Per-key sequence numbers let us check that order is kept within a key.
    seq = defaultdict(int)
    for i in range(N_MESSAGES):
        key = KEYS[i % len(KEYS)]
        yield key, f"{seq[key]}"
        seq[key] += 1


def _check(received: list[tuple[str, str]]) -> None:
    assert len(received) == N_MESSAGES
    per_key = defaultdict(list)
    for key, value in received:
        per_key[key].append(int(value))
    for key, seqs in per_key.items():
        assert seqs == list(range(len(seqs))), f"order broken for {key}: {seqs}"


def test_confluent_round_trip(kafka_bootstrap_server):
    topic = f"rt-confluent-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap_server, {topic: 3})
    create_topics(kafka_bootstrap_server, {topic: 3})  # idempotent

    producer = Producer({"bootstrap.servers": kafka_bootstrap_server, "enable.idempotence": True})
    for key, value in _messages():
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0

    consumer = Consumer({
        "bootstrap.servers": kafka_bootstrap_server,
        "group.id": f"g-{topic}",
        "auto.offset.reset": "earliest",
    })
    consumer.subscribe([topic])
    received, partitions = [], set()
    deadline = time.monotonic() + 60
    try:
        while len(received) < N_MESSAGES and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            partitions.add(msg.partition())
            received.append((msg.key().decode(), msg.value().decode()))
    finally:
        consumer.close()
    _check(received)
    assert len(partitions) > 1  # keys really were spread over the 3 partitions


def test_aiokafka_round_trip(kafka_bootstrap_server):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = f"rt-aiokafka-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap_server, {topic: 3})

    async def run() -> list[tuple[str, str]]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_server, enable_idempotence=True)
        await producer.start()
        try:
            for key, value in _messages():
                await producer.send(topic, key=key.encode(), value=value.encode())
            await producer.flush()
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap_server,
            group_id=f"g-{topic}",
            auto_offset_reset="earliest",
        )
        await consumer.start()
        received = []
        try:
            deadline = time.monotonic() + 60
            while len(received) < N_MESSAGES and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    received += [(r.key.decode(), r.value.decode()) for r in records]
            await consumer.commit()
        finally:
            await consumer.stop()
        return received

    _check(asyncio.run(run()))


# Run as a separate process: a Faust worker owns its event loop and signal
# handlers, which does not mix with pytest. It writes the table to a file once
# every message has been counted; the test then stops it with SIGTERM.
FAUST_APP = textwrap.dedent('''
    import json, os, sys
    import faust

    bootstrap, topic_name, datadir, out, expected = sys.argv[1:6]
    app = faust.App(
        "mlsa4rec-smoke-" + topic_name,
        broker="kafka://" + bootstrap,
        store="rocksdb://",
        datadir=datadir,
        topic_partitions=3,
        web_enabled=False,
    )
    topic = app.topic(topic_name, key_type=str, value_type=str,
                      key_serializer="raw", value_serializer="raw")
    counts = app.Table("counts", default=int, partitions=3)

    @app.agent(topic)
    async def count(stream):
        async for event in stream.events():
            counts[event.key.decode() if isinstance(event.key, bytes) else event.key] += 1

    @app.timer(0.5)
    async def report():
        # Table reads go through the RocksDB store of the partitions we own.
        total = sum(counts.values())
        if total >= int(expected) and not os.path.exists(out):
            with open(out + ".tmp", "w") as f:
                json.dump(dict(counts.items()), f)
            os.replace(out + ".tmp", out)

    if __name__ == "__main__":
        sys.argv = [sys.argv[0], "worker", "-l", "warn"]
        app.main()
''')


def test_faust_table_smoke(kafka_bootstrap_server, tmp_path):
    topic = f"rt-faust-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap_server, {topic: 3})
    producer = Producer({"bootstrap.servers": kafka_bootstrap_server})
    for key, value in _messages():
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0

    script = tmp_path / "smoke_app.py"
    script.write_text(FAUST_APP)
    out = tmp_path / "counts.json"
    log = open(tmp_path / "faust.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, str(script), kafka_bootstrap_server, topic,
         str(tmp_path / "data"), str(out), str(N_MESSAGES)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        tail = log.read()[-3000:]
        log.close()
    assert out.exists(), f"faust worker never counted {N_MESSAGES} messages:\n{tail}"

    counts = json.loads(out.read_text())
    expected = defaultdict(int)
    for key, _ in _messages():
        expected[key] += 1
    assert counts == dict(expected)
    # Faust created its changelog topic itself through the broker's admin API.
    names = AdminClient({"bootstrap.servers": kafka_bootstrap_server}).list_topics(timeout=10).topics
    assert any(name.endswith("-counts-changelog") for name in names), sorted(names)
    assert os.listdir(tmp_path / "data"), "RocksDB store wrote nothing"


def test_a_topic_created_again_under_its_name_has_a_new_topic_id(kafka_bootstrap_server):
    """The worker keeps the topic id of `interactions` with each user's last offset
    (streams/worker/scoring.py): that id must change when the topic is deleted and created again."""
    from streams.shared.topics import ensure_topics, topic_id

    name = f"recreated-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap_server, {name: 2})
    first = topic_id(kafka_bootstrap_server, name)
    assert first and first == topic_id(kafka_bootstrap_server, name)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap_server})
    admin.delete_topics([name])[name].result(30)
    deadline = time.monotonic() + 60
    while True:             # deletion completes asynchronously on the broker
        try:
            ensure_topics(kafka_bootstrap_server, {name: 2})
            second = topic_id(kafka_bootstrap_server, name)
            break
        except Exception:   # noqa: BLE001 - still being deleted
            assert time.monotonic() < deadline, "the topic was not created again"
            time.sleep(0.5)
    assert second != first
