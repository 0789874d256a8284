"""What each bad input gets (docs/RELIABILITY.md keeps the table): a dead-letter reason for
what cannot be scored, normal scoring for what only looks odd, and nothing lost either way.
The end-to-end path (the reason in a header on the dead-letter topic, the worker going on) is
tests/test_stream_e2e.py; the replay file's broken rows are tests/test_data.py."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
import torch

from schemas.codec import DecodeError, encode_interaction
from streams.worker.agents import to_event
from streams.shared.clicks import MAX_ID_BYTES
from streams.worker.scoring import Event, Scorer, UserRecord
from tests.test_scoring import ITEM_IDS, small_model

CLICK = {"event_id": "e1", "user_id": "u1", "item_id": "item3", "event_type": "CLICK",
         "timestamp": 1_700_000_000_000, "properties": None}


def message(value: bytes, key: bytes | None = b"u1"):
    return SimpleNamespace(value=value, message=SimpleNamespace(partition=0, offset=7, key=key))


def wire(**changes) -> bytes:
    return encode_interaction({**CLICK, **changes})


@pytest.mark.parametrize("payload, reason", [
    (b"not avro at all", "bad magic byte"),
    (b"", "empty payload"),
    (b"\x00\x00\x00", "truncated header"),
    (b"\x00" + struct.pack(">I", 999) + wire()[5:], "unknown schema id 999"),   # wrong schema id
    (wire()[:12], "truncated"),                                              # fields missing
    (wire() + b"\x00", "trailing bytes"),
    (wire(user_id=""), "empty user_id"),
    (wire(item_id=""), "empty item_id"),
    (wire(event_id=""), "empty event_id"),
    (wire(user_id="u" * (MAX_ID_BYTES + 1)), "user_id longer than 1024 bytes"),
    (wire(item_id="i" * 1_000_000), "item_id longer than 1024 bytes"),
], ids=["undecodable", "empty", "short-header", "wrong-schema-id", "missing-fields",
        "trailing-bytes", "empty-user", "empty-item", "empty-event-id", "huge-user-id",
        "huge-item-id"])
def test_what_cannot_be_scored_gets_a_dead_letter_reason(payload, reason):
    with pytest.raises(DecodeError, match=reason):
        to_event(message(payload))


@pytest.mark.parametrize("key", [None, b"session-42", b"u10"], ids=["no-key", "other", "prefix"])
def test_a_click_not_keyed_by_its_user_gets_a_dead_letter_reason(key):
    # Another key may land it in another partition than the user's state: refused, not split.
    with pytest.raises(DecodeError, match="is not the user_id"):
        to_event(message(wire(), key=key))


@pytest.mark.parametrize("changes", [
    {"timestamp": 0},                                       # 1970
    {"timestamp": -62_135_596_800_000},                     # year 1
    {"timestamp": 253_402_300_799_000},                     # year 9999
    {"event_type": "PURCHASE"},
    {"event_type": "UNKNOWN"},                              # what a newer writer's symbol reads as
    {"item_id": "never-seen-item"},
    {"user_id": "u" * MAX_ID_BYTES},                        # at the limit
], ids=["epoch", "year-1", "year-9999", "purchase", "unknown-type", "unknown-item", "long-id"])
def test_what_only_looks_odd_is_scored(changes):
    event = to_event(message(wire(**changes), key=changes.get("user_id", "u1").encode()))
    scorer = Scorer(small_model(), ITEM_IDS, "v1")
    _, recs, stats = scorer.process([event], {event.user_id: None})
    assert stats.applied == 1 and len(recs) == 1 and len(recs[0]["items"]) == 10
    assert recs[0]["event_timestamp"] == event.timestamp_ms    # carried, never used by the model


def test_a_user_with_very_many_events_keeps_a_constant_size_record():
    scorer = Scorer(small_model(), ITEM_IDS, "v1")
    record, sizes = None, []
    g = torch.Generator().manual_seed(0)
    for batch in range(20):                                 # 20 batches x 500 events, one user
        events = [Event("heavy", f"item{int(torch.randint(1, 40, (1,), generator=g))}",
                        f"e{batch}-{i}", 0, 0, batch * 500 + i) for i in range(500)]
        updated, recs, stats = scorer.process(events, {"heavy": record})
        assert stats.applied == 500 and len(recs) == 500
        record = UserRecord.from_bytes(updated["heavy"].to_bytes())
        sizes.append(len(updated["heavy"].to_bytes()))
    assert record.events_applied == 10_000 and len(record.history) == 50
    assert max(sizes) - min(sizes) < 200                    # only the header's numbers grow


# ------------------------------------------------------------------- `mlsa4rec produce`

GOOD_LINE = '{"user_id": "u1", "item_id": "i1", "timestamp": 1700000000000}'


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "Expecting property name"),
    ('["u1", "i1"]', "not a JSON object"),
    ('{"user_id": "u1"}', "user_id and item_id are required"),
    ('{"user_id": "u1", "item_id": "i1", "timestamp": "yesterday"}',
     "timestamp 'yesterday' is not epoch milliseconds"),
    ('{"user_id": "u1", "item_id": "i1", "properties": {"n": 1}}', "properties"),
])
def test_each_bad_click_record_is_named_with_its_file_and_record(tmp_path, bad_line, reason):
    from streams.shared.clients import BadClick, read_clicks

    path = tmp_path / "clicks.jsonl"
    path.write_text("\n".join([GOOD_LINE, "", GOOD_LINE, bad_line, GOOD_LINE]) + "\n")
    clicks = read_clicks(str(path))
    assert [next(clicks)["item_id"], next(clicks)["item_id"]] == ["i1", "i1"]
    with pytest.raises(BadClick, match=f"clicks.jsonl: record 3: .*{reason}"):
        next(clicks)


def test_a_bad_csv_row_is_named_too(tmp_path):
    from streams.shared.clients import BadClick, check_clicks

    path = tmp_path / "clicks.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,1700000000000\nu2,,1700000000001\n")
    with pytest.raises(BadClick, match="clicks.csv: record 2: user_id and item_id are required"):
        check_clicks(str(path))


class RecordingProducer:
    sent: list = []

    def __init__(self, config):
        pass

    def produce(self, topic, key, value, on_delivery):
        RecordingProducer.sent.append(key)

    def poll(self, timeout):
        return 0

    def flush(self, timeout):
        return 0


def test_produce_sends_nothing_of_a_file_with_a_bad_record_and_says_so_for_stdin(
        tmp_path, monkeypatch):
    import io

    import cli
    from streams.shared import clients

    monkeypatch.setattr(clients, "Producer", RecordingProducer)
    RecordingProducer.sent = []
    path = tmp_path / "clicks.jsonl"
    path.write_text("\n".join([GOOD_LINE, GOOD_LINE, '{"user_id": "u3"}', GOOD_LINE]) + "\n")
    with pytest.raises(SystemExit, match="nothing sent: .*clicks.jsonl: record 3"):
        cli.main(["produce", str(path)])
    assert RecordingProducer.sent == []                        # a fixed file can be sent whole

    # stdin cannot be read twice: what came before the bad record is sent, and counted
    monkeypatch.setattr("sys.stdin", io.StringIO(path.read_text()))
    with pytest.raises(SystemExit, match="-: record 3: .*the 2 clicks before it were sent"):
        cli.main(["produce", "-"])
    assert RecordingProducer.sent == [b"u1", b"u1"]

    path.write_text(GOOD_LINE + "\n")
    assert cli.main(["produce", str(path)]) == 0
    assert RecordingProducer.sent == [b"u1", b"u1", b"u1"]
    with pytest.raises(SystemExit, match="cannot read .*missing.jsonl"):
        cli.main(["produce", str(tmp_path / "missing.jsonl")])


def test_produce_streams_a_pipe_instead_of_reading_it_twice(tmp_path, monkeypatch):
    """A named pipe (or /dev/stdin, <(...)) can be read once: it is sent as it comes."""
    import os
    import threading

    import cli
    from streams.shared import clients

    monkeypatch.setattr(clients, "Producer", RecordingProducer)
    RecordingProducer.sent = []
    fifo = tmp_path / "clicks.jsonl"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "w") as pipe:
            pipe.write(GOOD_LINE + "\n" + GOOD_LINE + "\n")
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert cli.main(["produce", str(fifo)]) == 0
    assert RecordingProducer.sent == [b"u1", b"u1"]
