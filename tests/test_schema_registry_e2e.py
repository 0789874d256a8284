"""The worker with a real Schema Registry, against confluent-kafka's own Avro serializers.

A real broker and a real Confluent-compatible registry (Apicurio Registry's ccompat API,
streams/shared/local_registry.py; SCHEMA_REGISTRY_URL uses one you run). Users on Confluent's
stack produce clicks with confluent-kafka's AvroSerializer and read recommendations with its
AvroDeserializer; the worker (`mlsa4rec worker --schema-registry-url`) must score the first and
write what the second decodes, and clicks written with an older and a newer registered version
of the Interaction schema must still decode (evolution through the registry).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer

from schemas.codec import load_schema_json
from streams.shared.clients import PRODUCER_DEFAULTS
from streams.shared.config import StreamConfig, use_configured_schemas
from tests.test_stream_e2e import (REPO, Worker, assert_matches_offline, checkpoint,  # noqa: F401
                                   clicks_for, http_get, metric, offline_expectation)

confluent_avro = pytest.importorskip("confluent_kafka.schema_registry.avro")
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient  # noqa: E402
from confluent_kafka.schema_registry.error import SchemaRegistryError  # noqa: E402
from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: E402


@pytest.fixture(scope="module")
def registry_url():
    external = os.environ.get("SCHEMA_REGISTRY_URL")
    if external:
        yield external
        return
    from streams.shared.local_registry import RegistryUnavailable, local_registry

    try:
        with local_registry() as url:
            yield url
    except RegistryUnavailable as exc:
        pytest.skip(f"no schema registry: {exc}")


def interaction_versions() -> dict[str, dict]:
    """The Interaction schema as an older writer had it (no `properties`: the current reader
    fills its default), the current one, and a newer one (an added optional `session_id`)."""
    current = load_schema_json("interaction")
    older = copy.deepcopy(current)
    older["fields"] = [f for f in older["fields"] if f["name"] != "properties"]
    newer = copy.deepcopy(current)
    newer["fields"].append({"name": "session_id", "type": ["null", "string"], "default": None})
    return {"older": older, "current": current, "newer": newer}


def avro_serializer(client, schema: dict):
    return confluent_avro.AvroSerializer(client, json.dumps(schema),
                                         conf={"auto.register.schemas": True})


def schema_id(value: bytes) -> int:
    assert value[0] == 0, "not the Confluent wire format"
    return int.from_bytes(value[1:5], "big", signed=True)


def read_decoded(bootstrap, topic, deserializer, want, timeout=120.0):
    """(schema id, record) of each message of `topic` from its start, decoded by `deserializer`,
    until `want` records came or `timeout` passed."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout
    try:
        while len(out) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            ctx = SerializationContext(topic, MessageField.VALUE)
            out.append((schema_id(msg.value()), deserializer(msg.value(), ctx)))
    finally:
        consumer.close()
    return out


def test_a_bad_registry_url_is_refused_and_client_settings_come_from_the_environment(monkeypatch):
    from schemas import codec

    with pytest.raises(ValueError, match="must start with http"):
        use_configured_schemas(StreamConfig(schema_registry_url="127.0.0.1:8081"))
    try:
        use_configured_schemas(StreamConfig(schema_registry_url="http://127.0.0.1:1", interactions_topic="clicks"),
                               environ={"MLSA4REC_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": "u:p",
                                        "MLSA4REC_SCHEMA_REGISTRY_MAX_RETRIES": "0"})
        schemas = codec._codec("interaction").schemas
        assert schemas.client._rest_client.max_retries == 0         # a number, as the client wants
        assert schemas.subject_for("mlsa4rec.Interaction") == "clicks-value"
        assert schemas.subject_for("mlsa4rec.Recommendation") == "recommendations-value"
        # Nothing answers there: registering says which registry and subject, as a RegistryError.
        with pytest.raises(codec.RegistryError, match="127.0.0.1:1.*clicks-value"):
            codec.encode_interaction({"event_id": "e", "user_id": "u", "item_id": "i",
                                      "event_type": "CLICK", "timestamp": 1})
    finally:
        codec.use_schema_registry("")
    assert codec._codec("interaction").schemas.__class__ is codec.PinnedSchemas


def test_confluent_serializers_and_the_worker_through_a_real_registry(
        kafka_bootstrap_server, registry_url, checkpoint, tmp_path):  # noqa: F811
    path, model = checkpoint
    name = uuid.uuid4().hex[:8]
    clicks_topic, recs_topic = f"interactions-{name}", f"recommendations-{name}"
    client = SchemaRegistryClient({"url": registry_url})
    subject = f"{clicks_topic}-value"
    # Under BACKWARD (Confluent's default rule) every version must read the one before it: the
    # registry, not the test, vouches that these versions are compatible evolutions.
    client.set_compatibility(subject, "BACKWARD")
    versions = interaction_versions()
    serializers = {label: avro_serializer(client, schema) for label, schema in versions.items()}

    worker = Worker(kafka_bootstrap_server, path, tmp_path, name)
    worker.args += ["--schema-registry-url", registry_url]
    worker.start()
    try:
        clicks = clicks_for(n_users=6, per_user=5, seed=3)
        labels = list(versions)
        producer = Producer({"bootstrap.servers": kafka_bootstrap_server, **PRODUCER_DEFAULTS})
        for n, click in enumerate(clicks):
            label = labels[n % len(labels)]              # each user's clicks in all three versions
            record = {k: v for k, v in click.items() if k != "properties" or label != "older"}
            if label == "newer":
                record["session_id"] = f"session-{click['user_id']}"
            value = serializers[label](record, SerializationContext(clicks_topic, MessageField.VALUE))
            producer.produce(clicks_topic, key=click["user_id"].encode(), value=value)
        producer.flush(30)
        ids = {label: client.lookup_schema(subject, Schema(json.dumps(schema), "AVRO")).schema_id
               for label, schema in versions.items()}
        assert len(set(ids.values())) == 3, ids
        assert client.get_versions(subject) == [1, 2, 3]
        # A change that would break old readers is refused by the registry itself.
        broken = copy.deepcopy(versions["current"])
        broken["fields"][2]["type"] = "long"                          # item_id: string -> long
        with pytest.raises(SchemaRegistryError):
            client.register_schema(subject, Schema(json.dumps(broken), "AVRO"))

        # A few more clicks through `mlsa4rec produce --schema-registry-url` (the project's own
        # encoder, registering the current schema: the same id the AvroSerializer got).
        produced = clicks_for(n_users=1, per_user=3, seed=4, first_ts=1_800_000_000_000)
        for click in produced:
            click.update(user_id="cli-user", event_id="cli-" + click["event_id"])
        source = tmp_path / "clicks.jsonl"
        source.write_text("".join(json.dumps(c) + "\n" for c in produced))
        done = subprocess.run([sys.executable, "-m", "cli", "produce", str(source), "--broker",
                               kafka_bootstrap_server, "--interactions-topic", clicks_topic,
                               "--schema-registry-url", registry_url],
                              cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

        everything = clicks + produced
        deserializer = confluent_avro.AvroDeserializer(client)     # writer schema = reader schema
        recs = read_decoded(kafka_bootstrap_server, recs_topic, deserializer, len(everything))
        got = {}
        for _, rec in recs:
            got.setdefault(rec["event_id"], []).append(rec)
        assert_matches_offline(got, offline_expectation(model, everything))
        # The worker registered recommendation.avsc under the topic's subject and wrote its id.
        rec_subject = client.get_latest_version(f"{recs_topic}-value")
        assert {sid for sid, _ in recs} == {rec_subject.schema_id}
        registered = json.loads(rec_subject.schema.schema_str)
        assert (registered["namespace"], registered["name"]) == ("mlsa4rec", "Recommendation")

        # The CLI's clicks carry the current version's id and decode with Confluent's reader.
        sent = read_decoded(kafka_bootstrap_server, clicks_topic,
                            confluent_avro.AvroDeserializer(client), len(everything))
        by_event = {record["event_id"]: (sid, record) for sid, record in sent}
        for click in produced:
            sid, record = by_event[click["event_id"]]
            assert sid == ids["current"] and record["item_id"] == click["item_id"]
        assert {sid for sid, _ in sent} == set(ids.values())

        page = http_get(worker.metrics_port, "/metrics")
        assert metric(page, 'mlsa4rec_events_total{outcome="applied"}') == len(everything)
        dead = 'mlsa4rec_events_total{outcome="dead_letter"}'
        assert dead + " " not in page or metric(page, dead) == 0
    finally:
        worker.stop()


def test_a_worker_whose_registry_cannot_be_reached_stops_and_says_so(
        kafka_bootstrap_server, checkpoint, tmp_path):  # noqa: F811
    from streams.shared.local_broker import free_ports

    (closed,) = free_ports(1)                            # nothing listens there
    worker = Worker(kafka_bootstrap_server, checkpoint[0], tmp_path, uuid.uuid4().hex[:8])
    worker.args += ["--schema-registry-url", f"http://127.0.0.1:{closed}"]
    worker.env["MLSA4REC_SCHEMA_REGISTRY_MAX_RETRIES"] = "0"
    worker.start()
    try:
        assert worker.process.wait(120) != 0
    finally:
        worker.stop()
    assert (f"schema registry http://127.0.0.1:{closed}: cannot register mlsa4rec.Recommendation "
            f"under recommendations-{worker.name}-value") in worker.log_tail()
