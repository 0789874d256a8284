"""The hand-written Interaction reader in schemas/codec.py against fastavro.

decode_interaction reads a body itself when the writer schema has the Interaction layout,
and hands anything it cannot vouch for to fastavro. Whatever the bytes, its outcome must be
the one fastavro's path gives: an equal dict, or a DecodeError. The reference here is an
AvroCodec with the fast reader switched off, i.e. the decode path as it was before.
"""

from __future__ import annotations

import copy
import random

import fastavro
import pytest

import schemas.codec as codec
from schemas.codec import (
    AvroCodec,
    DecodeError,
    PinnedSchemas,
    decode_interaction,
    encode_interaction,
    load_schema,
    load_schema_json,
)

SYMBOLS = ["CLICK", "VIEW", "PURCHASE", "ADD_TO_CART", "RATE", "UNKNOWN"]
MIN_MS, MAX_MS = -62_135_596_800_000, 253_402_300_799_999   # datetime's years 1 and 9999

CLICK = {"event_id": "0b3c5e1e-6c1f-4a53-9d1b-3f1f2f0c9a77", "user_id": "user-48213",
         "item_id": "item-90817", "event_type": "CLICK", "timestamp": 1_700_000_000_123,
         "properties": None}
RICH = dict(CLICK, event_type="RATE", user_id="ユーザー🙂" * 20,       # a length > 63: 2-byte varint
            properties={"rating": "4", "page": "home", "ключ": "значение"})


def _generic_codec() -> AvroCodec:
    generic = AvroCodec("interaction", PinnedSchemas())
    generic._fast_body = None       # fastavro + _to_millis for every message
    return generic


GENERIC = _generic_codec()


def outcome(decode, data):
    """('ok', record) or ('error', reason); anything but DecodeError propagates and fails."""
    try:
        return "ok", decode(data)
    except DecodeError as e:
        assert 0 < len(str(e)) <= 200
        return "error", str(e)


def same_outcome(data) -> tuple:
    fast, generic = outcome(decode_interaction, data), outcome(GENERIC.decode, data)
    assert fast == generic, f"{data!r}"
    return fast


def must_reject(data) -> None:
    kind, _ = same_outcome(data)
    assert kind == "error", f"{data!r} was accepted"


@pytest.fixture
def fastavro_calls(monkeypatch):
    """How many bodies fastavro read (the fast path never calls it)."""
    calls = []
    real = fastavro.schemaless_reader

    def counting(*args, **kwargs):
        calls.append(args[1].get("name") if isinstance(args[1], dict) else args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(codec.fastavro, "schemaless_reader", counting)
    return calls


# -- hand-built bytes (Avro spec), independent of both readers

def varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def raw_str(raw: bytes) -> bytes:
    return varint(len(raw)) + raw


def text(s: str) -> bytes:
    return raw_str(s.encode())


def header(schema_id: int) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big", signed=True)


IDS = text("e1") + text("u1") + text("i1")   # event_id, user_id, item_id


def body(enum=b"\x00", ts=varint(1000), props=b"\x00", ids=IDS) -> bytes:
    return ids + enum + ts + props


def wire(schema_id=1, **parts) -> bytes:
    return header(schema_id) + body(**parts)


# -- the fast path is on, and used

def test_current_schema_gets_the_fast_reader():
    # Fails when interaction.avsc changes layout without _INTERACTION_LAYOUT (and the
    # reader) following: the codec would quietly fall back to fastavro for everything.
    assert codec._has_interaction_layout(load_schema("interaction"))
    assert codec._pinned_codec("interaction")._fast_body is not None
    assert AvroCodec("interaction", PinnedSchemas(), timestamps="datetime")._fast_body is None


def test_valid_clicks_do_not_touch_fastavro(fastavro_calls):
    for rec in (CLICK, RICH):
        assert decode_interaction(encode_interaction(rec)) == rec
    assert fastavro_calls == []


def test_bad_bodies_are_left_to_fastavro(fastavro_calls):
    with pytest.raises(DecodeError, match="trailing bytes"):
        decode_interaction(encode_interaction(CLICK) + b"\x00")
    assert fastavro_calls == ["mlsa4rec.Interaction"]


# -- equality over many valid records

ALPHABETS = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x3040, 0x30FF),
             (0x4E00, 0x9FFF), (0xE000, 0xF8FF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]


def random_text(rng: random.Random, longest: int) -> str:
    size = rng.choice([0, 1, 2, rng.randint(0, longest), rng.randint(60, 70)])
    out = []
    for _ in range(size):
        lo, hi = rng.choice(ALPHABETS)
        out.append(chr(rng.randint(lo, hi)))       # no range reaches the surrogates
    return "".join(out)


def random_timestamp(rng: random.Random) -> int:
    return rng.choice([0, 1, -1, 63, 64, -64, -65, MIN_MS, MAX_MS, 1_700_000_000_000,
                       rng.randint(MIN_MS, MAX_MS), rng.randint(MIN_MS, 0),
                       rng.randint(0, 2 ** 31), -rng.randint(0, 2 ** 31)])


def random_properties(rng: random.Random):
    kind = rng.randrange(4)
    if kind == 0:
        return None
    if kind == 1:
        return {}
    return {random_text(rng, 12): random_text(rng, 30) for _ in range(rng.randint(1, 8))}


def test_random_valid_records_decode_equal_on_both_paths(fastavro_calls):
    rng = random.Random(20240607)
    records = []
    for i in range(3000):
        records.append({"event_id": random_text(rng, 40), "user_id": random_text(rng, 40),
                        "item_id": random_text(rng, 40), "event_type": SYMBOLS[i % len(SYMBOLS)],
                        "timestamp": random_timestamp(rng), "properties": random_properties(rng)})
    encoded = [encode_interaction(rec) for rec in records]
    fast = [decode_interaction(data) for data in encoded]
    assert fastavro_calls == []                      # all of them took the fast path
    generic = [GENERIC.decode(data) for data in encoded]
    assert fast == generic == records
    for f, g in zip(fast, generic):
        assert [type(v) for v in f.values()] == [type(v) for v in g.values()]
        assert list(f) == list(g)                    # same field order too


@pytest.mark.parametrize("ts", [MIN_MS, MIN_MS + 1, -1, 0, 1, MAX_MS - 1, MAX_MS])
def test_timestamp_limits(ts):
    data = wire(ts=varint(ts))
    assert same_outcome(data) == ("ok", dict(decode_interaction(data), timestamp=ts))
    assert decode_interaction(data)["timestamp"] == ts


@pytest.mark.parametrize("ts", [MIN_MS - 1, MAX_MS + 1, 2 ** 62, -(2 ** 62), 2 ** 63 - 1, -(2 ** 63)])
def test_timestamps_fastavro_cannot_turn_into_a_datetime_are_refused(ts):
    must_reject(wire(ts=varint(ts)))


# -- map blocks

def test_map_with_negative_block_counts():
    k1, v1, k2, v2, k3, v3 = (text(s) for s in ("page", "home", "ключ", "значение", "n", ""))
    block1 = k1 + v1 + k2 + v2
    props = (b"\x02"                                   # union branch 1: the map
             + varint(-2) + varint(len(block1)) + block1
             + varint(1) + k3 + v3
             + varint(-1) + varint(len(k1 + v3)) + k1 + v3   # a repeated key: the last one wins
             + b"\x00")
    data = wire(props=props)
    expected = {"page": "", "ключ": "значение", "n": ""}
    assert same_outcome(data) == ("ok", dict(GENERIC.decode(data), properties=expected))
    assert codec._read_interaction_body(data, 5)["properties"] == expected


def test_map_block_size_is_not_checked_by_either_path():
    # fastavro reads the byte size of a negative-count block and ignores it; so does the
    # fast reader, so a wrong size changes nothing.
    entry = text("k") + text("v")
    for size in (0, 1, 999, -5):
        data = wire(props=b"\x02" + varint(-1) + varint(size) + entry + b"\x00")
        assert same_outcome(data)[1]["properties"] == {"k": "v"}


@pytest.mark.parametrize("props", [
    b"\x02\x00",                                        # an empty map (one end marker)
    b"\x02" + varint(0),
    b"\x02" + varint(-(2 ** 63)) + varint(0) + b"\x00",  # count whose negation overflows in C
    b"\x02" + varint(2) + text("k") + text("v") + b"\x00",        # a count larger than the entries
    b"\x02" + varint(2 ** 40) + text("k") + text("v") + b"\x00",
    b"\x02" + varint(-1) + text("k") + text("v") + b"\x00",        # the size missing
    b"\x02" + varint(1) + text("k") + b"\x00",                     # a value missing
    b"\x02" + varint(1) + text("k") + raw_str(b"v"),               # the end marker missing
])
def test_odd_maps_same_outcome(props):
    same_outcome(wire(props=props))


# -- bad input

def test_truncated_at_every_byte(fastavro_calls):
    for rec in (CLICK, RICH, dict(RICH, timestamp=-1, event_type="UNKNOWN")):
        data = encode_interaction(rec)
        for cut in range(len(data)):
            must_reject(data[:cut])
        assert same_outcome(data) == ("ok", rec)


@pytest.mark.parametrize("payload", [
    b"", b"\x00", b"\x00\x00\x00\x00",
    b"\x01" + body(), b"\xff" + body(), b'{"user_id": "u1"}',          # bad magic
    header(99) + body(), header(0) + body(), header(-1) + body(),       # unknown schema ids
    wire() + b"\x00", wire() + b"\xff\xff",                              # trailing bytes
    wire(props=b"\x02" + varint(1) + text("k") + text("v") + b"\x00\x00"),
])
def test_envelope_errors(payload):
    must_reject(payload)


def test_not_bytes():
    for value in ("text", None, 5, [0, 0]):
        with pytest.raises(DecodeError):
            decode_interaction(value)
        with pytest.raises(DecodeError):
            GENERIC.decode(value)


def test_bytearray_and_memoryview_decode_like_bytes():
    data = encode_interaction(RICH)
    assert decode_interaction(bytearray(data)) == decode_interaction(memoryview(data)) == RICH


@pytest.mark.parametrize("index", [6, 7, 63, 64, 1000, 2 ** 40, -7, -100])
def test_enum_index_out_of_range(index):
    must_reject(wire(enum=varint(index)))


@pytest.mark.parametrize("index", range(6))
def test_every_enum_symbol(index):
    assert same_outcome(wire(enum=varint(index)))[1]["event_type"] == SYMBOLS[index]


@pytest.mark.parametrize("index", [-1, -6])
def test_negative_enum_index_reads_as_fastavro_reads_it(index):
    # fastavro indexes the symbol list Python-style, so -1 reads as UNKNOWN today. The fast
    # reader does not copy that; it leaves such a body to fastavro, which keeps the outcome.
    assert codec._read_interaction_body(wire(enum=varint(index)), 5) is None
    same_outcome(wire(enum=varint(index)))


@pytest.mark.parametrize("branch", [2, 3, 64, 2 ** 40, -3])
def test_union_index_out_of_range(branch):
    must_reject(wire(props=varint(branch)))


@pytest.mark.parametrize("branch", [b"\x01", b"\x03", b"\x80\x00", b"\x82\x00"])
def test_union_index_negative_or_in_two_bytes_same_outcome(branch):
    # -1 / -2 (Python-style indexing again) and non-minimal varints of 0 and 1: fastavro
    # accepts them; the fast reader leaves them to it.
    tail = b"\x00" if branch in (b"\x01", b"\x82\x00") else b""
    assert codec._read_interaction_body(wire(props=branch + tail), 5) is None
    assert same_outcome(wire(props=branch + tail))[0] == "ok"


BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"ok\x80", b"\xf0\x9f\x99"]


@pytest.mark.parametrize("raw", BAD_UTF8)
@pytest.mark.parametrize("where", ["event_id", "user_id", "item_id", "map key", "map value"])
def test_invalid_utf8_is_refused(raw, where):
    fields = [text("e1"), text("u1"), text("i1")]
    props = b"\x00"
    if where.startswith("map"):
        key, value = (raw_str(raw), text("v")) if where == "map key" else (text("k"), raw_str(raw))
        props = b"\x02" + varint(1) + key + value + b"\x00"
    else:
        fields[["event_id", "user_id", "item_id"].index(where)] = raw_str(raw)
    must_reject(wire(ids=b"".join(fields), props=props))


@pytest.mark.parametrize("size", [-1, -2, 2 ** 40, 200])
def test_string_lengths_negative_or_past_the_end(size):
    must_reject(wire(ids=varint(size) + b"e1" + text("u1") + text("i1")))


OVERLONG = {
    "11-byte timestamp": dict(ts=b"\x82" + b"\x80" * 9 + b"\x01"),
    "20-byte timestamp": dict(ts=b"\x82" + b"\x80" * 18 + b"\x00"),
    "10-byte, bits past 64": dict(ts=b"\x82" + b"\x80" * 8 + b"\x7f"),
    "10-byte, top bit": dict(ts=b"\x80" * 9 + b"\x01"),
    "11-byte enum index": dict(enum=b"\x80" * 10 + b"\x00"),
    "11-byte string length": dict(ids=b"\x84" + b"\x80" * 9 + b"\x00" + b"e1" + text("u1") + text("i1")),
    "11-byte union index": dict(props=b"\x80" * 10 + b"\x00"),
    "11-byte map count": dict(props=b"\x02" + b"\x82" + b"\x80" * 9 + b"\x00" + text("k") + text("v") + b"\x00"),
    "runs to the end": dict(ts=b"\x80" * 12),
    "10-byte map block size, bits past 64": dict(
        props=b"\x02" + varint(-1) + b"\x80" * 9 + b"\x7f" + text("k") + text("v") + b"\x00"),
}


@pytest.mark.parametrize("parts", OVERLONG.values(), ids=OVERLONG.keys())
def test_overlong_varints(parts):
    data = wire(**parts)
    # The fast reader never decodes a varint longer than 10 bytes or wider than 64 bits...
    assert codec._read_interaction_body(data, 5) is None
    # ...and the outcome is fastavro's. Mind that fastavro REFUSES only some of these: its
    # shift count wraps past 64 bits, so an 11-byte varint reads as a (wrong) small number.
    same_outcome(data)


def test_non_minimal_varints_decode_equal():
    # 0 written in two bytes, 1000 in three: legal, if unusual; both paths read the value.
    data = wire(enum=b"\x82\x00", ts=b"\xd0\x8f\x00",
                ids=b"\x84\x00e1" + text("u1") + text("i1"),
                props=b"\x02\x82\x00" + text("k") + text("v") + b"\x80\x00")
    kind, rec = same_outcome(data)
    assert kind == "ok" and rec["event_type"] == "VIEW" and rec["timestamp"] == 1000
    assert rec["event_id"] == "e1" and rec["properties"] == {"k": "v"}


def test_random_corruptions_same_outcome():
    rng = random.Random(7)
    samples = [encode_interaction(rec) for rec in (CLICK, RICH, dict(RICH, properties={}))]
    for _ in range(4000):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 3)):
            action = rng.randrange(3)
            at = rng.randrange(5, len(data))
            if action == 0:
                data[at] = rng.randrange(256)
            elif action == 1:
                del data[at]
            else:
                data.insert(at, rng.randrange(256))
        same_outcome(bytes(data))


# -- other writer schema ids

def _variant(mutate):
    raw = copy.deepcopy(load_schema_json("interaction"))
    mutate(raw)
    return raw


def _with_share(raw):
    next(f for f in raw["fields"] if f["name"] == "event_type")["type"]["symbols"].append("SHARE")


def _with_session(raw):
    raw["fields"].append({"name": "session_id", "type": "string", "default": "none"})


def _reworded(raw):
    raw["doc"] = "same layout, other words"


def _micros(raw):
    next(f for f in raw["fields"] if f["name"] == "timestamp")["type"]["logicalType"] = "timestamp-micros"


def test_other_layouts_decode_through_fastavro(fastavro_calls):
    pins = PinnedSchemas()
    pins.add(10, _variant(_with_share))
    pins.add(11, _variant(_with_session))
    reader = AvroCodec("interaction", pins)
    share = AvroCodec("interaction", pins, schema=_variant(_with_share)).encode(dict(CLICK, event_type="SHARE"))
    session = AvroCodec("interaction", pins, schema=_variant(_with_session)).encode(dict(CLICK, session_id="s"))
    assert share[:5] == header(10) and session[:5] == header(11)
    assert reader.decode(share) == dict(CLICK, event_type="UNKNOWN")     # the enum default
    assert reader.decode(session) == CLICK                             # the added field skipped
    assert fastavro_calls == ["mlsa4rec.Interaction"] * 2
    assert reader.decode(encode_interaction(CLICK)) == CLICK           # id 1: still the fast path
    assert len(fastavro_calls) == 2


def test_same_canonical_form_other_words_takes_the_fast_path(fastavro_calls):
    pins = PinnedSchemas()
    pins.add(12, _variant(_reworded))
    data = header(12) + encode_interaction(RICH)[5:]
    assert AvroCodec("interaction", pins).decode(data) == RICH
    assert fastavro_calls == []


def test_same_canonical_form_other_logical_type_is_not_the_fast_path(fastavro_calls):
    # The Parsing Canonical Form drops logicalType, but fastavro converts by it: a writer
    # declaring timestamp-micros has the same form and other meaning.
    pins = PinnedSchemas()
    pins.add(13, _variant(_micros))
    data = header(13) + encode_interaction(CLICK)[5:]
    fast_reader, generic_reader = AvroCodec("interaction", pins), AvroCodec("interaction", pins)
    generic_reader._fast_body = None
    assert fast_reader.decode(data) == generic_reader.decode(data)
    assert fast_reader.decode(data)["timestamp"] == CLICK["timestamp"] // 1000
    assert len(fastavro_calls) == 3


def test_a_reader_with_another_layout_never_uses_the_fast_reader(fastavro_calls):
    pins = PinnedSchemas()
    pins.add(11, _variant(_with_session), current=True)
    new = AvroCodec("interaction", pins, schema=_variant(_with_session))
    assert new._fast_body is None
    assert new.decode(encode_interaction(CLICK)) == dict(CLICK, session_id="none")
    assert fastavro_calls == ["mlsa4rec.Interaction"]
