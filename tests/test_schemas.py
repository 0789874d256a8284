"""Tests for schemas/codec.py: wire format, errors, evolution, registry glue."""

import copy
import datetime as dt
import json

import pytest

from schemas.codec import (
    AvroCodec,
    DecodeError,
    EncodeError,
    PinnedSchemas,
    RegistryError,
    RegistrySchemas,
    decode_interaction,
    decode_recommendation,
    encode_interaction,
    encode_recommendation,
    load_schema,
    load_schema_json,
)

UTC = dt.timezone.utc
TS = 1_700_000_000_000  # 2023-11-14T22:13:20Z

EVENT = {
    "event_id": "e1",
    "user_id": "u1",
    "item_id": "i9",
    "event_type": "CLICK",
    "timestamp": TS,
    "properties": None,
}

RECO = {
    "user_id": "u1",
    "event_id": "e1",
    "event_timestamp": TS,
    "items": [
        {"item_id": "i3", "score": 0.75, "rank": 1},  # exactly representable as float32
        {"item_id": "i7", "score": -1.5, "rank": 2},
    ],
    "model_version": "mlsa4rec-2024.1",
    "produced_at": TS + 12,
}


# -- independent reference encoding (Avro spec), used only to build expected bytes

def zigzag_varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)  # zigzag: 0,-1,1,-2 -> 0,1,2,3
    out = bytearray()
    while True:
        b = z & 0x7F
        z >>= 7
        if z:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def avro_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return zigzag_varint(len(raw)) + raw


def header(schema_id: int) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big", signed=True)


# -- schema files / pinned ids

def test_schema_files_parse_and_have_expected_shape():
    inter = load_schema("interaction")
    assert inter["name"] == "mlsa4rec.Interaction"
    raw = load_schema_json("Interaction")
    et = next(f for f in raw["fields"] if f["name"] == "event_type")["type"]
    assert et["default"] == "UNKNOWN" and "UNKNOWN" in et["symbols"]
    props = next(f for f in raw["fields"] if f["name"] == "properties")
    assert props["type"][0] == "null" and props["default"] is None
    reco = load_schema_json("recommendation.avsc")
    assert [f["name"] for f in reco["fields"]] == [
        "user_id", "event_id", "event_timestamp", "items", "model_version", "produced_at"]


def test_pinned_ids_from_ids_json():
    pins = PinnedSchemas()
    assert pins.current_id("Interaction") == 1
    assert pins.current_id("mlsa4rec.Recommendation") == 2
    assert pins.schema_for(1)["name"] == "mlsa4rec.Interaction"
    with pytest.raises(DecodeError, match="unknown schema id 42"):
        pins.schema_for(42)


# -- golden bytes

def test_golden_bytes_literal():
    # Everything spelled out by hand: header id 1; strings are zigzag length
    # (2 -> 0x04) + utf-8; enum VIEW = index 1 -> 0x02; timestamp 1000 ->
    # zigzag 2000 = 0b1111_1010000 -> 0xD0 0x0F; union branch 1 (map) -> 0x02,
    # one map block of 1 entry -> 0x02, "k" -> 0x02 'k', "v" -> 0x02 'v', end 0x00.
    rec = {"event_id": "e1", "user_id": "u1", "item_id": "i9", "event_type": "VIEW",
           "timestamp": 1000, "properties": {"k": "v"}}
    expected = (b"\x00\x00\x00\x00\x01"
                b"\x04e1" b"\x04u1" b"\x04i9"
                b"\x02"
                b"\xd0\x0f"
                b"\x02" b"\x02" b"\x02k" b"\x02v" b"\x00")
    assert encode_interaction(rec) == expected
    assert decode_interaction(expected) == rec


def test_golden_bytes_realistic_timestamp():
    expected = (header(1) + avro_str("e1") + avro_str("u1") + avro_str("i9")
                + b"\x00"                 # CLICK is enum index 0
                + zigzag_varint(TS)       # long
                + b"\x00")                # union branch 0 = null
    assert zigzag_varint(TS) == b"\x80\xa0\xab\xfe\xf9\x62"  # sanity of the reference helper
    assert encode_interaction(EVENT) == expected


# -- round trips / timestamps

def test_interaction_round_trip_with_properties_and_default_props():
    rec = dict(EVENT, event_type="RATE", properties={"rating": "4", "page": "home"})
    assert decode_interaction(encode_interaction(rec)) == rec
    no_props = {k: v for k, v in EVENT.items() if k != "properties"}
    assert decode_interaction(encode_interaction(no_props)) == EVENT  # default null filled in


def test_recommendation_round_trip():
    data = encode_recommendation(RECO)
    assert data[:5] == header(2)
    assert decode_recommendation(data) == RECO
    empty = dict(RECO, items=[])
    assert decode_recommendation(encode_recommendation(empty)) == empty


def test_aware_datetime_in_millis_out_and_datetime_option():
    when = dt.datetime.fromtimestamp(TS / 1000, tz=UTC)
    data = encode_interaction(dict(EVENT, timestamp=when))
    assert data == encode_interaction(EVENT)
    assert decode_interaction(data)["timestamp"] == TS
    as_dt = AvroCodec("interaction", PinnedSchemas(), timestamps="datetime").decode(data)
    assert as_dt["timestamp"] == when and as_dt["timestamp"].tzinfo is not None
    # non-UTC aware datetimes are converted, not misread
    plus2 = when.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert decode_interaction(encode_interaction(dict(EVENT, timestamp=plus2)))["timestamp"] == TS


# -- DecodeError cases (messages are dead-letter header values: check them)

GOOD = encode_interaction(EVENT)


@pytest.mark.parametrize("payload, message", [
    (b"", "empty payload"),
    (b'{"user_id": "u1"}', "bad magic byte 0x7b (expected 0x00: not Confluent Avro)"),
    (b"\x00\x00\x01", "truncated header: 3 bytes, need 5"),
    (header(99) + b"\x04e1", "unknown schema id 99"),
    (GOOD[:-4], "truncated"),
    (header(1) + b"\x03", "truncated body (schema id 1)"),   # negative string length
    (GOOD + b"\xff\xff", "2 trailing bytes after record (schema id 1)"),
    (header(1) + avro_str("e") * 3 + b"\x20", "corrupt body (schema id 1)"),  # enum index 16
    ("not bytes", "payload must be bytes, got str"),
])
def test_decode_errors(payload, message):
    with pytest.raises(DecodeError) as exc:
        decode_interaction(payload)
    assert message in str(exc.value)
    assert len(str(exc.value)) <= 200


def test_decode_error_is_value_error():
    assert issubclass(DecodeError, ValueError) and issubclass(EncodeError, DecodeError)


@pytest.mark.parametrize("change, message", [
    ({"user_id": None}, "field 'user_id' expects string, got NoneType None"),
    ({"timestamp": "yesterday"}, "field 'timestamp' expects timestamp-millis"),
    ({"event_type": "LIKE"}, "field 'event_type' expects one of"),
    ({"properties": {"rating": 4}}, "field 'properties' expects null or map<string>, got dict"),
    ({"timestamp": dt.datetime(2024, 1, 1)}, "field 'timestamp' is a naive datetime"),
])
def test_encode_wrong_type(change, message):
    with pytest.raises(EncodeError) as exc:
        encode_interaction(dict(EVENT, **change))
    assert message in str(exc.value)


def test_encode_missing_required_field_names_it():
    rec = {k: v for k, v in EVENT.items() if k != "item_id"}
    with pytest.raises(DecodeError, match="missing required field 'item_id'"):
        encode_interaction(rec)
    with pytest.raises(EncodeError, match="field 'ScoredItem.score' expects float"):
        encode_recommendation(dict(RECO, items=[{"item_id": "a", "score": "high", "rank": 1}]))
    with pytest.raises(EncodeError, match="record must be a dict"):
        encode_interaction([("user_id", "u1")])


# -- evolution

def _variant(mutate):
    raw = copy.deepcopy(load_schema_json("interaction"))
    mutate(raw)
    return raw


def _with_symbol(raw):
    et = next(f for f in raw["fields"] if f["name"] == "event_type")["type"]
    et["symbols"] = et["symbols"] + ["SHARE"]


def _with_session(raw):
    raw["fields"].append({"name": "session_id", "type": "string", "default": "none"})


def test_unknown_enum_symbol_reads_as_default():
    pins = PinnedSchemas()
    pins.add(10, _variant(_with_symbol))
    newer = AvroCodec("interaction", pins, schema=_variant(_with_symbol))
    data = newer.encode(dict(EVENT, event_type="SHARE"))
    assert data[:5] == header(10)
    old = AvroCodec("interaction", pins)
    assert old.decode(data)["event_type"] == "UNKNOWN"
    assert old.decode(newer.encode(EVENT))["event_type"] == "CLICK"  # known symbols unaffected


def test_new_reader_reads_old_events_with_default():
    pins = PinnedSchemas()
    pins.add(3, _variant(_with_session), current=True)
    old = AvroCodec("interaction", pins, schema=load_schema_json("interaction"))
    new = AvroCodec("interaction", pins, schema=_variant(_with_session))
    old_bytes = old.encode(EVENT)
    assert old_bytes[:5] == header(1)  # old writer still labels its bytes with id 1
    assert new.decode(old_bytes) == dict(EVENT, session_id="none")


def test_old_reader_reads_new_events_ignoring_added_field():
    pins = PinnedSchemas()
    pins.add(3, _variant(_with_session), current=True)
    new = AvroCodec("interaction", pins, schema=_variant(_with_session))
    new_bytes = new.encode(dict(EVENT, session_id="s-42"))
    assert new_bytes[:5] == header(3)
    # the module-level helpers use ids.json only, which does not know id 3 yet
    with pytest.raises(DecodeError, match="unknown schema id 3"):
        decode_interaction(new_bytes)
    old = AvroCodec("interaction", pins)  # old reader schema, pins that know id 3
    assert old.decode(new_bytes) == EVENT


def test_incompatible_writer_is_a_decode_error():
    pins = PinnedSchemas()
    pins.add(7, {"type": "record", "name": "Interaction", "namespace": "mlsa4rec",
                 "fields": [{"name": "user_id", "type": "int"}]})
    data = AvroCodec("x", pins, schema=pins.schema_for(7)).encode({"user_id": 5})
    with pytest.raises(DecodeError, match="schema id 7 .* cannot be read as mlsa4rec.Interaction"):
        AvroCodec("interaction", pins).decode(data)


def test_pinned_refuses_to_label_unpinned_schema():
    codec = AvroCodec("interaction", PinnedSchemas(), schema=_variant(_with_session))
    with pytest.raises(EncodeError, match="not pinned"):
        codec.encode(dict(EVENT, session_id="s"))


def test_pinned_rejects_reusing_an_id():
    with pytest.raises(ValueError, match="already pinned"):
        PinnedSchemas().add(1, _variant(_with_session))


# -- RegistrySchemas with a fake client

class NotFound(Exception):
    http_status_code = 404


class FakeRegistryClient:
    """Implements the two SchemaRegistryClient methods RegistrySchemas calls."""

    def __init__(self):
        self.by_id = {}
        self.subjects = {}
        self.register_calls = []
        self.get_calls = []

    def register_schema(self, subject_name, schema, normalize_schemas=False):
        self.register_calls.append(subject_name)
        assert schema.schema_type == "AVRO"
        for sid, s in self.by_id.items():
            if s == schema.schema_str:
                break
        else:
            sid = 100 + len(self.by_id)
            self.by_id[sid] = schema.schema_str
        self.subjects.setdefault(subject_name, []).append(sid)
        return sid

    def get_schema(self, schema_id, subject_name=None, fmt=None):
        self.get_calls.append(schema_id)
        if schema_id not in self.by_id:
            raise NotFound(f"Schema {schema_id} not found")

        class _Schema:
            schema_str = self.by_id[schema_id]
            schema_type = "AVRO"
        return _Schema()


def test_registry_registers_under_topic_subject_and_round_trips():
    client = FakeRegistryClient()
    producer_side = AvroCodec("interaction", RegistrySchemas(client))
    data = producer_side.encode(EVENT)
    producer_side.encode(dict(EVENT, event_id="e2"))
    assert client.register_calls == ["interactions-value"]  # cached after the first encode
    assert data[:5] == header(100)
    registered = json.loads(client.by_id[100])
    assert registered["name"] == "mlsa4rec.Interaction"
    assert not any(k.startswith("__") for k in registered)  # plain Avro JSON, no fastavro internals

    consumer_side = AvroCodec("interaction", RegistrySchemas(client))
    assert consumer_side.decode(data) == EVENT
    assert consumer_side.decode(data) == EVENT
    assert client.get_calls == [100]  # writer schema fetched once, then cached

    reco = AvroCodec("recommendation", RegistrySchemas(client))
    assert reco.decode(reco.encode(RECO)) == RECO
    assert "recommendations-value" in client.subjects


def test_registry_unknown_id_is_decode_error_but_outage_is_not():
    client = FakeRegistryClient()
    codec = AvroCodec("interaction", RegistrySchemas(client))
    with pytest.raises(DecodeError, match="unknown schema id 555"):
        codec.decode(header(555) + b"\x00")

    class Down(FakeRegistryClient):
        def get_schema(self, schema_id, subject_name=None, fmt=None):
            raise ConnectionError("registry unreachable")

    # Must not dead-letter good messages: a RegistryError (not a DecodeError), with the cause.
    with pytest.raises(RegistryError, match="cannot fetch schema id") as caught:
        AvroCodec("interaction", RegistrySchemas(Down())).decode(GOOD)
    assert not isinstance(caught.value, DecodeError)
    assert isinstance(caught.value.__cause__, ConnectionError)


def test_registry_custom_topic():
    client = FakeRegistryClient()
    codec = AvroCodec("interaction", RegistrySchemas(client, topics={"Interaction": "clicks"}))
    codec.encode(EVENT)
    assert client.register_calls == ["clicks-value"]
