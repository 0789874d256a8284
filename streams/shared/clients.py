"""Plain confluent-kafka clients for the command line: produce clicks, tail recommendations."""

from __future__ import annotations

import csv
import json
import sys
import time
import uuid
from typing import Iterable, Iterator

from confluent_kafka import Consumer, KafkaError, Producer

from schemas.codec import DecodeError, decode_recommendation, encode_interaction
from streams.shared.kafka_config import client_config

# librdkafka's default partitioner differs from the Java client's; murmur2 puts a user on the
# partition that Java and aiokafka (Faust) producers would choose too.
PRODUCER_DEFAULTS = {"partitioner": "murmur2_random", "enable.idempotence": True,
                     "linger.ms": 5}


class BadClick(ValueError):
    """A record of a clicks file that cannot be sent; says which file and record."""


def read_clicks(path: str) -> Iterator[dict]:
    """JSON lines ('-' = stdin) or a CSV with a header; user_id and item_id are required.

    Each click is checked as the wire would check it (it must encode as an Interaction); a
    record that fails raises BadClick naming the file and the record (1-based, empty JSON
    lines not counted; for a CSV, its data rows)."""
    stream = sys.stdin if path == "-" else open(path, newline="")
    try:
        rows: Iterable = (csv.DictReader(stream) if path.endswith(".csv")
                          else (line for line in stream if line.strip()))
        for record_no, row in enumerate(rows, start=1):
            try:
                click = _click(row if isinstance(row, dict) else json.loads(row))
                encode_interaction(click)
            except (ValueError, TypeError) as exc:
                raise BadClick(f"{path}: record {record_no}: {exc}") from None
            yield click
    finally:
        if stream is not sys.stdin:
            stream.close()


def _click(row) -> dict:
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    if not row.get("user_id") or not row.get("item_id"):
        raise ValueError("user_id and item_id are required")
    timestamp = row.get("timestamp")
    try:
        timestamp = int(timestamp) if timestamp not in (None, "") else int(time.time() * 1000)
    except (TypeError, ValueError):
        raise ValueError(f"timestamp {timestamp!r} is not epoch milliseconds") from None
    return {
        "event_id": row.get("event_id") or uuid.uuid4().hex,
        "user_id": str(row["user_id"]),
        "item_id": str(row["item_id"]),
        "event_type": row.get("event_type") or "CLICK",
        "timestamp": timestamp,
        "properties": row.get("properties"),
    }


def check_clicks(path: str) -> int:
    """Read the whole file once, sending nothing: its number of clicks, or BadClick."""
    return sum(1 for _ in read_clicks(path))


def produce_clicks(bootstrap: str, topic: str, clicks: Iterable[dict], extra: dict | None = None) -> int:
    """Send clicks keyed by user id. If the clicks run into a bad record, what came before it
    is still delivered and the error says how many clicks that was."""
    producer = Producer({**client_config(bootstrap), **PRODUCER_DEFAULTS, **(extra or {})})
    errors: list[str] = []

    def on_delivery(err, _msg):
        if err is not None:
            errors.append(str(err))

    count = 0
    try:
        for click in clicks:
            producer.produce(topic, key=click["user_id"].encode(),
                             value=encode_interaction(click), on_delivery=on_delivery)
            producer.poll(0)
            count += 1
    except BadClick as exc:
        producer.flush(30)
        raise BadClick(f"{exc}; the {count} clicks before it were sent") from None
    producer.flush(30)
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} clicks were not delivered: {errors[0]}")
    return count


def tail_recommendations(bootstrap: str, topic: str, from_beginning: bool = False,
                         max_messages: int = 0, idle_timeout: float = 0.0) -> Iterator[dict]:
    """Yield decoded recommendations; stop after max_messages or idle_timeout s of silence.
    A message that does not decode raises DecodeError naming its topic, partition and offset."""
    consumer = Consumer({**client_config(bootstrap), "group.id": f"tail-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest" if from_beginning else "latest",
                         "enable.auto.commit": False})
    consumer.subscribe([topic])
    seen, last = 0, time.monotonic()
    try:
        while not max_messages or seen < max_messages:
            msg = consumer.poll(0.5)
            if msg is None:
                if idle_timeout and time.monotonic() - last > idle_timeout:
                    return
                continue
            if msg.error():
                if msg.error().code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    continue                    # not created yet: keep waiting
                raise RuntimeError(str(msg.error()))
            last = time.monotonic()
            seen += 1
            try:
                rec = decode_recommendation(msg.value())
            except DecodeError as exc:      # which message, so that it can be looked at
                raise DecodeError(f"{msg.topic()} partition {msg.partition()} offset "
                                  f"{msg.offset()}: {exc}") from None
            yield rec
    finally:
        consumer.close()
