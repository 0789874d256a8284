"""Avro encode/decode in the Confluent wire format.

Wire format (what Confluent serializers produce and expect):
    byte 0      0x00 magic
    bytes 1..4  schema id, big-endian signed int32
    bytes 5..   Avro binary body (no container-file header)

Decoding looks the WRITER schema up by the id in the header and resolves it
to the codec's READER schema; that resolution is what makes schema evolution
work (added fields get their defaults, removed fields are skipped, unknown
enum symbols fall back to the enum default).

Schema ids come from a "schema source", either
  * PinnedSchemas   - fixed ids from schemas/ids.json, no network, or
  * RegistrySchemas - a Confluent-compatible Schema Registry.
Both offer: id_for(full_name, schema) -> int and schema_for(id) -> parsed schema.
encode_interaction & co. and RecommendationWriter use the pinned ids unless the process
called use_schema_registry(url) (the commands' --schema-registry-url).

Timestamps: encode accepts int epoch millis or a tz-aware datetime.  Decode
returns int epoch millis by default (timestamps="millis"), because the rest of
the system does arithmetic on them; timestamps="datetime" keeps what fastavro
returns for timestamp-millis: a tz-aware UTC datetime.

Interaction bodies whose writer schema has the current layout are read by a
hand-written reader (see "fast Interaction reader" below) instead of fastavro; the
result, and every error, is the one the fastavro path gives.

Every bad payload raises DecodeError (a ValueError) with a short,
human-readable reason; the streaming worker puts that reason in a header of
the dead-letter message, so keep messages short and free of payload dumps.
"""

from __future__ import annotations

import datetime as _dt
import functools
import io
import json
import operator
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import fastavro
import numpy as np
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

SCHEMA_DIR = Path(__file__).resolve().parent
MAGIC = 0
_HEADER = struct.Struct(">bi")  # magic byte + big-endian int32 schema id
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_ONE_MS = _dt.timedelta(milliseconds=1)
_MAX_REASON = 200  # keep dead-letter header values small


class DecodeError(ValueError):
    """A payload (or record) that cannot be (de)serialized; str(e) is the reason."""

    def __init__(self, reason: str):
        if len(reason) > _MAX_REASON:
            reason = reason[: _MAX_REASON - 3] + "..."
        super().__init__(reason)
        self.reason = reason


class EncodeError(DecodeError):
    """Encode-side failure; subclass so one `except DecodeError` catches both."""


class RegistryError(RuntimeError):
    """The schema registry could not register a schema (unreachable, refused): a configuration
    problem, never a bad message, so not a DecodeError."""


# --------------------------------------------------------------------------
# schema files


def _schema_path(name: str) -> Path:
    """'interaction', 'Interaction', 'interaction.avsc' or a path -> file path."""
    p = Path(name)
    if p.suffix == ".avsc" and (p.is_absolute() or p.parent != Path(".")):
        return p
    stem = p.name[: -len(".avsc")] if p.name.endswith(".avsc") else p.name
    return SCHEMA_DIR / f"{stem.lower()}.avsc"


def load_schema_json(name: str) -> dict:
    """The raw JSON dict of a schema file (what gets registered)."""
    with open(_schema_path(name), encoding="utf-8") as f:
        return json.load(f)


def load_schema(name: str) -> dict:
    """Parsed fastavro schema for schemas/<name>.avsc (name case-insensitive)."""
    return fastavro.parse_schema(load_schema_json(name))


def _raw(schema: Any) -> Any:
    """Strip fastavro's private '__...' keys so a parsed schema is plain Avro JSON again."""
    if isinstance(schema, dict):
        return {k: _raw(v) for k, v in schema.items() if not k.startswith("__")}
    if isinstance(schema, list):
        return [_raw(v) for v in schema]
    return schema


def _parse(schema: Any) -> dict:
    # parse_schema gets a fresh named-type table each call, so re-parsing an
    # already parsed schema (which carries private keys) is avoided instead.
    if isinstance(schema, dict) and schema.get("__fastavro_parsed"):
        return schema
    return fastavro.parse_schema(schema)


def _fingerprint(schema: dict) -> str:
    # Parsing Canonical Form ignores doc/defaults/logical types: two schemas
    # with the same form produce identical bytes, so they may share an id.
    return to_parsing_canonical_form(_raw(schema))


def _short_name(full_name: str) -> str:
    return full_name.rsplit(".", 1)[-1]


# --------------------------------------------------------------------------
# schema sources


class PinnedSchemas:
    """Schema ids pinned in schemas/ids.json; no registry, no network.

    ids.json: {"Interaction": 1, "Recommendation": 2,
               "versions": {"1": "interaction.avsc", "2": "recommendation.avsc"}}
    Keys starting with '_' are comments.  `add()` pins extra versions in memory
    (tests, or a reader that must understand a schema not yet in a file).
    """

    def __init__(self, path: str | Path | None = None):
        path = Path(path) if path else SCHEMA_DIR / "ids.json"
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        self._by_id: dict[int, dict] = {}
        self._current: dict[str, int] = {}
        for sid, fname in cfg.get("versions", {}).items():
            self.add(int(sid), load_schema_json(str(path.parent / fname)))
        for name, sid in cfg.items():
            if name.startswith("_") or name == "versions":
                continue
            if int(sid) not in self._by_id:
                raise ValueError(f"{path}: id {sid} for {name} has no entry in 'versions'")
            self._current[name] = int(sid)

    def add(self, schema_id: int, schema: dict, current: bool = False) -> None:
        """Pin `schema` under `schema_id`; current=True makes encoders of its name use it."""
        parsed = _parse(schema)
        old = self._by_id.get(schema_id)
        if old is not None and _fingerprint(old) != _fingerprint(parsed):
            raise ValueError(f"schema id {schema_id} is already pinned to another schema")
        self._by_id[schema_id] = parsed
        if current:
            self._current[_short_name(parsed["name"])] = schema_id

    def current_id(self, name: str) -> int:
        return self._current[_short_name(name)]

    def id_for(self, full_name: str, schema: dict) -> int:
        """Id to write `schema` with: the pinned id whose schema is the same.

        Refusing an unpinned schema stops a producer from labelling bytes with
        an id whose schema would decode them wrongly.
        """
        fp = _fingerprint(schema)
        short = _short_name(full_name)
        cur = self._current.get(short)
        if cur is not None and _fingerprint(self._by_id[cur]) == fp:
            return cur
        for sid, s in sorted(self._by_id.items()):
            if _fingerprint(s) == fp:
                return sid
        raise EncodeError(f"schema {full_name} is not pinned in ids.json; add it under a new id")

    def schema_for(self, schema_id: int) -> dict:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise DecodeError(f"unknown schema id {schema_id}") from None


class _PlainSchema:
    """Stand-in for confluent_kafka's Schema when it cannot be imported
    (its package import needs optional extras such as authlib)."""

    def __init__(self, schema_str: str, schema_type: str = "AVRO"):
        self.schema_str = schema_str
        self.schema_type = schema_type
        self.references: list = []


def _schema_factory() -> Callable[[str, str], Any]:
    try:
        from confluent_kafka.schema_registry import Schema
    except ImportError:
        return _PlainSchema
    return Schema


class RegistrySchemas:
    """Schema ids from a Confluent-compatible Schema Registry.

    `client` needs register_schema(subject, Schema) -> int and
    get_schema(schema_id) -> object with .schema_str, like
    confluent_kafka.schema_registry.SchemaRegistryClient.  Subjects follow
    the TopicNameStrategy: '<topic>-value', topic looked up by record name.
    Results are cached: one register per schema, one get per id.
    """

    DEFAULT_TOPICS = {"Interaction": "interactions", "Recommendation": "recommendations"}

    def __init__(self, client: Any, topics: Mapping[str, str] | None = None, url: str = ""):
        self.client = client
        self.url = url  # only for error messages
        self.topics = dict(self.DEFAULT_TOPICS if topics is None else topics)
        self._make_schema = _schema_factory()
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, dict] = {}
        self._lock = threading.Lock()  # producers may share one instance across threads

    @classmethod
    def from_url(cls, url: str, topics: Mapping[str, str] | None = None, **conf: Any) -> "RegistrySchemas":
        """Build with a real SchemaRegistryClient ({'url': url, **conf})."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return cls(SchemaRegistryClient({"url": url, **conf}), topics, url)

    def subject_for(self, full_name: str) -> str:
        short = _short_name(full_name)
        try:
            return f"{self.topics[short]}-value"
        except KeyError:
            raise EncodeError(f"no topic configured for record {full_name}") from None

    def id_for(self, full_name: str, schema: dict) -> int:
        subject = self.subject_for(full_name)
        schema_str = json.dumps(_raw(schema), separators=(",", ":"))
        key = (subject, schema_str)
        with self._lock:
            sid = self._ids.get(key)
            if sid is None:
                # Registry errors (incompatible schema, network) are configuration
                # problems, not bad messages: RegistryError, naming registry and subject.
                try:
                    sid = int(self.client.register_schema(subject, self._make_schema(schema_str, "AVRO")))
                except Exception as e:
                    raise RegistryError(f"schema registry {self.url or ''}: cannot register "
                                        f"{full_name} under {subject}: {type(e).__name__}: {e}") from e
                self._ids[key] = sid
                self._schemas.setdefault(sid, _parse(json.loads(schema_str)))
            return sid

    def schema_for(self, schema_id: int) -> dict:
        with self._lock:
            parsed = self._schemas.get(schema_id)
        if parsed is not None:
            return parsed
        try:
            reg = self.client.get_schema(schema_id)
        except Exception as e:
            # Only "not found" means the message is bad; an unreachable
            # registry must not send good messages to the dead-letter topic: it is a
            # RegistryError (configuration), naming the registry, as registering is.
            if getattr(e, "http_status_code", None) == 404 or isinstance(e, KeyError):
                raise DecodeError(f"unknown schema id {schema_id}") from None
            raise RegistryError(f"schema registry {self.url or ''}: cannot fetch schema id "
                                f"{schema_id}: {type(e).__name__}: {e}") from e
        try:
            parsed = _parse(json.loads(reg.schema_str))
        except Exception as e:
            raise DecodeError(f"schema id {schema_id} is not a usable Avro schema: {e}") from None
        with self._lock:
            self._schemas[schema_id] = parsed
        return parsed


# --------------------------------------------------------------------------
# codec


def _to_millis(value: Any) -> Any:
    """Recursively turn datetimes (fastavro's timestamp-millis) into int epoch millis."""
    if isinstance(value, _dt.datetime):
        return (value - _EPOCH) // _ONE_MS
    if isinstance(value, dict):
        return {k: _to_millis(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_millis(v) for v in value]
    return value


def _describe(datum: Any) -> str:
    r = repr(datum)
    return f"{type(datum).__name__} {r if len(r) <= 40 else r[:37] + '...'}"


class AvroCodec:
    """Encode/decode one record type in the Confluent wire format.

    name:     schema file name ('interaction', 'recommendation')
    schemas:  PinnedSchemas / RegistrySchemas (anything with id_for/schema_for)
    schema:   optional schema dict overriding the file (e.g. a newer version);
              it is both the writer schema for encode and the reader for decode
    timestamps: 'millis' (default) -> decoded timestamp-millis are int epoch
              millis; 'datetime' -> tz-aware UTC datetimes as fastavro gives.
    """

    def __init__(self, name: str, schemas: Any, *, schema: dict | None = None,
                 timestamps: str = "millis"):
        if timestamps not in ("millis", "datetime"):
            raise ValueError("timestamps must be 'millis' or 'datetime'")
        self.schema = _parse(schema if schema is not None else load_schema_json(name))
        self.full_name: str = self.schema["name"]
        self.schemas = schemas
        self.timestamps = timestamps
        self._fields = self.schema["fields"]
        self._by_name = {f["name"]: f for f in self._fields}
        self._ts_fields = [f["name"] for f in self._fields
                           if isinstance(f["type"], dict) and f["type"].get("logicalType") == "timestamp-millis"]
        self._id: int | None = None  # resolved lazily so building a codec needs no registry call
        # The hand-written body reader (see _read_interaction_body) stands in for fastavro
        # when both this reader schema and a message's writer schema have its layout.
        self._fast_body = (_read_interaction_body
                           if timestamps == "millis" and _has_interaction_layout(self.schema) else None)
        self._fast_writers: dict[int, tuple[Any, bool]] = {}  # schema id -> (writer schema, layout matches)

    @property
    def schema_id(self) -> int:
        if self._id is None:
            self._id = self.schemas.id_for(self.full_name, self.schema)
        return self._id

    def _check(self, record: Any) -> None:
        if not isinstance(record, Mapping):
            raise EncodeError(f"{self.full_name}: record must be a dict, got {type(record).__name__}")
        for f in self._fields:
            if f["name"] not in record and "default" not in f:
                raise EncodeError(f"{self.full_name}: missing required field '{f['name']}'")
        # Naive datetimes would silently be taken as UTC; refuse the guess.
        for name in self._ts_fields:
            v = record.get(name)
            if isinstance(v, _dt.datetime) and v.tzinfo is None:
                raise EncodeError(f"{self.full_name}: field '{name}' is a naive datetime; use tz-aware or int millis")
        try:
            validate(record, self.schema, raise_errors=True)
        except ValidationError as e:
            errs = getattr(e, "errors", None) or ()
            if errs:
                err = errs[0]
                field = str(err.field).removeprefix(self.full_name + ".")
                expected = err.schema
                top = self._by_name.get(field)
                if top is not None and isinstance(top["type"], list):
                    # fastavro reports the last union branch tried; name the whole union
                    expected, datum = top["type"], record.get(field)
                else:
                    datum = err.datum
                    ns = self.full_name.rpartition(".")[0]
                    field = field.removeprefix(ns + ".") if ns else field
                raise EncodeError(f"{self.full_name}: field '{field}' expects {_schema_label(expected)}, "
                                  f"got {_describe(datum)}") from None
            raise EncodeError(f"{self.full_name}: invalid record") from None

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Record dict -> magic + schema id + Avro body. Raises EncodeError."""
        self._check(record)
        buf = io.BytesIO()
        buf.write(_HEADER.pack(MAGIC, self.schema_id))
        try:
            fastavro.schemaless_writer(buf, self.schema, dict(record))
        except Exception as e:  # validate() should have caught it; keep the contract anyway
            raise EncodeError(f"{self.full_name}: cannot encode: {type(e).__name__}: {e}") from None
        return buf.getvalue()

    def decode(self, data: bytes) -> dict:
        """Wire bytes -> record dict in this codec's (reader) schema. Raises DecodeError."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"payload must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if not data:
            raise DecodeError("empty payload")
        if data[0] != MAGIC:
            raise DecodeError(f"bad magic byte 0x{data[0]:02x} (expected 0x00: not Confluent Avro)")
        if len(data) < _HEADER.size:
            raise DecodeError(f"truncated header: {len(data)} bytes, need {_HEADER.size}")
        _, sid = _HEADER.unpack_from(data)
        writer = self.schemas.schema_for(sid)  # raises DecodeError for an unknown id
        if self._fast_body is not None:
            seen = self._fast_writers.get(sid)
            if seen is None or seen[0] is not writer:  # first sight, or the source now has another schema
                seen = self._fast_writers[sid] = (writer, _has_interaction_layout(writer))
            if seen[1]:
                record = self._fast_body(data, _HEADER.size)
                if record is not None:
                    return record
                # Not a plain well-formed body: fastavro below decides (and words the error).
        buf = io.BytesIO(data)
        buf.seek(_HEADER.size)
        try:
            record = fastavro.schemaless_reader(buf, writer, self.schema)
        except SchemaResolutionError as e:
            raise DecodeError(f"schema id {sid} ({writer.get('name')}) cannot be read as {self.full_name}: {e}") from None
        except EOFError:
            raise DecodeError(f"truncated body (schema id {sid})") from None
        except Exception as e:
            # fastavro's compiled reader reports a short buffer as IndexError,
            # the same as a bad enum/union index, so both are named here.
            raise DecodeError(f"truncated or corrupt body (schema id {sid}): {type(e).__name__}: {e}") from None
        rest = len(data) - buf.tell()
        if rest:
            # The writer schema fully determines the length; leftovers mean corruption.
            raise DecodeError(f"{rest} trailing bytes after record (schema id {sid})")
        if not isinstance(record, dict):
            raise DecodeError(f"schema id {sid} is not a record schema")
        return _to_millis(record) if self.timestamps == "millis" else record


def _schema_label(schema: Any) -> str:
    """Short human name of a (sub)schema for error messages."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return " or ".join(_schema_label(s) for s in schema)
    if isinstance(schema, dict):
        if schema.get("type") == "enum":
            return f"one of {schema.get('symbols')}"
        if schema.get("logicalType"):
            return f"{schema['logicalType']} (int millis or tz-aware datetime)"
        if schema.get("type") == "map":
            return f"map<{_schema_label(schema.get('values'))}>"
        if schema.get("type") == "array":
            return f"array<{_schema_label(schema.get('items'))}>"
        return str(schema.get("name") or schema.get("type"))
    return str(schema)


# --------------------------------------------------------------------------
# convenience helpers: the pinned ids, or the registry a process was pointed at

_default_lock = threading.Lock()
_default: dict[str, AvroCodec] = {}
_registry_codecs: dict[str, AvroCodec] | None = None  # set by use_schema_registry


def _pinned_codec(name: str) -> AvroCodec:
    codec = _default.get(name)  # every decode_* call comes here: take the lock only to build one
    if codec is None:
        with _default_lock:
            codec = _default.get(name)
            if codec is None:
                codec = _default[name] = AvroCodec(name, PinnedSchemas())
    return codec


def _codec(name: str) -> AvroCodec:
    registry = _registry_codecs
    return _pinned_codec(name) if registry is None else registry[name]


def use_schema_registry(url: str, topics: Mapping[str, str] | None = None, **conf: Any) -> None:
    """Make encode_*/decode_* and RecommendationWriter of this process take their schema ids
    from the Confluent-compatible registry at `url` (subjects '<topic>-value', topics
    {'Interaction': ..., 'Recommendation': ...}); url '' = the pinned ids again.

    Ids differ between the two sources, so every process that reads or writes a topic must
    use the same one. The registry is asked nothing here: the first encode registers its
    schema (a registry that cannot be reached or refuses it raises then), the first decode
    of an id fetches that id's schema."""
    global _registry_codecs
    if not url:
        _registry_codecs = None
        return
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"schema registry url {url!r} must start with http:// or https://")
    schemas = RegistrySchemas.from_url(url, topics, **conf)
    _registry_codecs = {name: AvroCodec(name, schemas) for name in ("interaction", "recommendation")}


def encode_interaction(record: Mapping[str, Any]) -> bytes:
    return _codec("interaction").encode(record)


def decode_interaction(data: bytes) -> dict:
    """Timestamps come back as int epoch millis."""
    return _codec("interaction").decode(data)


def encode_recommendation(record: Mapping[str, Any]) -> bytes:
    return _codec("recommendation").encode(record)


def decode_recommendation(data: bytes) -> dict:
    """Timestamps come back as int epoch millis."""
    return _codec("recommendation").decode(data)


# --------------------------------------------------------------------------
# fast Interaction reader (no fastavro, no datetimes)
#
# Clicks are decoded one by one (checked_click in the worker and the trainer), and
# fastavro plus the datetime round trip of `_to_millis` cost most of that.
# `_read_interaction_body` reads the Interaction body by hand.  AvroCodec.decode uses it only when both its reader
# schema and the message's writer schema have the layout below (same Parsing Canonical
# Form AND the same logical types, which the form leaves out but fastavro acts on), and
# only for bodies it can vouch for: anything odd (truncated, corrupt, trailing bytes, or
# one of the encodings fastavro accepts in its own way, see _long_at) makes it answer
# None and fastavro decides, so the outcome is always the one fastavro gives.

_EVENT_TYPES = ("CLICK", "VIEW", "PURCHASE", "ADD_TO_CART", "RATE", "UNKNOWN")

# What _read_interaction_body reads. interaction.avsc must keep this layout for the fast
# path to apply (tests/test_click_reader.py checks it does); evolving the schema means
# updating both, or the codec silently falls back to fastavro for every message.
_INTERACTION_LAYOUT = {
    "type": "record", "name": "Interaction", "namespace": "mlsa4rec",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "user_id", "type": "string"},
        {"name": "item_id", "type": "string"},
        {"name": "event_type", "type": {"type": "enum", "name": "EventType", "symbols": list(_EVENT_TYPES)}},
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "properties", "type": ["null", {"type": "map", "values": "string"}]},
    ],
}

# fastavro turns timestamp-millis into a datetime, so it refuses values outside datetime's
# years 1..9999; the fast reader leaves those to it.
_MIN_MS = (_dt.datetime.min.replace(tzinfo=_dt.timezone.utc) - _EPOCH) // _ONE_MS
_MAX_MS = (_dt.datetime.max.replace(tzinfo=_dt.timezone.utc) - _EPOCH) // _ONE_MS


def _logical_types(schema: Any) -> list[tuple[tuple, str]]:
    """(path, logicalType) of every logical type annotation in `schema`, in schema order."""
    found: list[tuple[tuple, str]] = []

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, list):
            for i, branch in enumerate(node):
                walk(branch, path + (i,))
        elif isinstance(node, dict):
            if "logicalType" in node:
                found.append((path, str(node["logicalType"])))
            if isinstance(node.get("type"), (dict, list)):
                walk(node["type"], path + ("type",))
            for field in node.get("fields") or ():
                walk(field.get("type"), path + ("fields", field.get("name")))
            for key in ("items", "values"):
                if key in node:
                    walk(node[key], path + (key,))

    walk(_raw(schema), ())
    return found


@functools.lru_cache(maxsize=None)
def _interaction_layout_key() -> tuple[str, list]:
    return _fingerprint(_parse(_INTERACTION_LAYOUT)), _logical_types(_INTERACTION_LAYOUT)


def _has_interaction_layout(schema: Any) -> bool:
    """True when `schema` reads and writes exactly like _INTERACTION_LAYOUT."""
    try:
        return (_fingerprint(schema), _logical_types(schema)) == _interaction_layout_key()
    except Exception:  # not a schema fastavro can put in canonical form: not ours to read
        return False


class _NotPlain(Exception):
    """Raised inside the fast reader for a body it leaves to fastavro."""


def _long_at(data: bytes, pos: int) -> tuple[int, int]:
    """The Avro long (zigzag varint) at data[pos] -> (value, position after it).

    IndexError when the bytes run out mid-varint. _NotPlain for a varint longer than
    10 bytes or with bits past the 64th: fastavro does not refuse those, it wraps them
    (its shift count overflows), and reproducing that is left to fastavro itself.
    """
    b = data[pos]
    pos += 1
    if b < 0x80:  # one byte: lengths, enum indices, counts
        return (b >> 1) ^ -(b & 1), pos
    n = b & 0x7F
    shift = 7
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            raise _NotPlain
    if n >> 64:
        raise _NotPlain
    return (n >> 1) ^ -(n & 1), pos


def _string_at(data: bytes, pos: int) -> tuple[str, int]:
    """The Avro string at data[pos] -> (text, position after it); strict UTF-8 like fastavro."""
    b = data[pos]
    if b < 0x80 and not b & 1:  # a length 0..63 in one byte
        size = b >> 1
        pos += 1
    else:
        size, pos = _long_at(data, pos)
        if size < 0:
            raise _NotPlain
    end = pos + size
    if end > len(data):
        raise _NotPlain
    return data[pos:end].decode(), end  # UnicodeDecodeError for invalid UTF-8


def _map_at(data: bytes, pos: int) -> tuple[dict, int]:
    """An Avro map<string> at data[pos]; blocks may have negative counts (then a byte size)."""
    out: dict[str, str] = {}
    while True:
        count, pos = _long_at(data, pos)
        if count == 0:
            return out, pos
        if count < 0:
            if count == _INT64_MIN:  # fastavro's negation of it overflows
                raise _NotPlain
            count = -count
            _, pos = _long_at(data, pos)  # byte size of the block; fastavro reads and ignores it
        for _ in range(count):  # every entry takes >= 2 bytes, so a huge count soon runs out
            key, pos = _string_at(data, pos)
            out[key], pos = _string_at(data, pos)  # a repeated key keeps its last value


def _read_interaction_body(data: bytes, pos: int) -> dict | None:
    """The Interaction whose body starts at data[pos], as AvroCodec.decode returns it
    (timestamp in int epoch millis), or None when fastavro should decide instead."""
    try:
        event_id, pos = _string_at(data, pos)
        user_id, pos = _string_at(data, pos)
        item_id, pos = _string_at(data, pos)
        index, pos = _long_at(data, pos)
        if not 0 <= index < len(_EVENT_TYPES):  # fastavro indexes the symbols Python-style: -1 is UNKNOWN
            return None
        timestamp, pos = _long_at(data, pos)
        if not _MIN_MS <= timestamp <= _MAX_MS:
            return None
        branch = data[pos]
        pos += 1
        if branch == 0:  # union branch 0: null
            properties = None
        elif branch == 2:  # union branch 1: the map
            properties, pos = _map_at(data, pos)
        else:  # other branches, negative ones, or 0/1 in more than one byte
            return None
    except (IndexError, UnicodeDecodeError, _NotPlain):
        return None
    if pos != len(data):
        return None
    return {"event_id": event_id, "user_id": user_id, "item_id": item_id,
            "event_type": _EVENT_TYPES[index], "timestamp": timestamp, "properties": properties}


# --------------------------------------------------------------------------
# fast Recommendation batches (no per-item dicts, no fastavro)

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_SMALL_LONGS = tuple(bytes((n << 1,)) for n in range(64))  # 0..63 zigzag to one byte


def _varint_long(n: int) -> bytes:
    """Avro long (or int): zigzag, then little-endian base-128 varint."""
    if 0 <= n < 64:  # lengths, counts and ranks: the common case, looked up
        return _SMALL_LONGS[n]
    if not _INT64_MIN <= n <= _INT64_MAX:
        raise ValueError(f"{n} does not fit an Avro long")
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _avro_string(s: str, what: str) -> bytes:
    if not isinstance(s, str):
        raise TypeError(f"{what} must be a str, got {type(s).__name__}")
    raw = s.encode("utf-8")
    return _varint_long(len(raw)) + raw  # the length counts bytes, not characters


def _as_2d(values: Any, name: str, integers: bool) -> np.ndarray:
    """A contiguous (rows, k) int64 or little-endian float32 array; torch tensors (any
    device) are accepted."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"{name}: rows of different lengths ({e})") from None
    if arr.size == 0 and arr.ndim == 1:
        arr = arr.reshape(0, 0)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x k), got shape {arr.shape}")
    if integers and arr.size and arr.dtype.kind not in "iu":
        # Casting floats to indices would silently truncate them.
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64 if integers else "<f4")


class RecommendationWriter:
    """Encodes batches of Recommendations to the exact bytes of `encode_recommendation`.

    item_ids: index -> raw item id; each id's Avro string is encoded once, here.
    schema_id: the id in the wire header; by default the one that encode_recommendation
    writes with (pinned, or registered where use_schema_registry was called). The layout written is recommendation.avsc's,
    so an id must name that schema (or one with the same Parsing Canonical Form).
    Immutable: a model with other items gets a new writer.
    """

    def __init__(self, item_ids: list[str], schema_id: int | None = None):
        self._ids = tuple(_avro_string(raw, f"item id at index {i}") for i, raw in enumerate(item_ids))
        self.schema_id = _codec("recommendation").schema_id if schema_id is None else int(schema_id)
        self._header = _HEADER.pack(MAGIC, self.schema_id)

    def __len__(self) -> int:
        return len(self._ids)

    def encode_batch(self, user_ids: list[str], event_ids: list[str], event_timestamps: list[int],
                     top_items: Any, scores: Any, model_version: str, produced_at: int) -> list[bytes]:
        """One wire-format Recommendation per row.

        top_items: (rows, k) item indices; scores: (rows, k) scores, written as float32.
        Items scored -inf are left out and never looked up (so their index may be a spare
        row); ranks are 1-based among the items kept. Raises ValueError for arguments whose
        rows disagree, IndexError for a kept item index outside item_ids.
        """
        rows = len(user_ids)
        for name, seq in (("event_ids", event_ids), ("event_timestamps", event_timestamps)):
            if len(seq) != rows:
                raise ValueError(f"{name} has {len(seq)} rows, user_ids has {rows}")
        items = _as_2d(top_items, "top_items", True)
        values = _as_2d(scores, "scores", False)
        if items.shape[0] != rows:
            raise ValueError(f"top_items has {items.shape[0]} rows, user_ids has {rows}")
        if values.shape != items.shape:
            raise ValueError(f"scores has shape {values.shape}, top_items has {items.shape}")
        k = items.shape[1]
        keep = values != -np.inf
        bad = keep & ((items < 0) | (items >= len(self._ids)))
        if bad.any():
            row, col = (int(x) for x in np.argwhere(bad)[0])
            raise IndexError(f"top_items[{row}][{col}] = {int(items[row, col])} is not an item "
                             f"index (the writer has {len(self._ids)} items)")

        ids, header = self._ids, self._header
        ranks = [_varint_long(r) for r in range(k + 1)]  # ranks 1..k, shared by every row
        packed = values.tobytes()  # every score of the batch in one call, sliced below
        tail = _avro_string(model_version, "model_version") + _varint_long(operator.index(produced_at))
        all_kept = bool(keep.all())
        kept_counts = keep.sum(axis=1).tolist()
        items_list = items.tolist()
        keep_list = None if all_kept else keep.tolist()
        out = []
        for row in range(rows):
            parts = [header, _avro_string(user_ids[row], "user_id"),
                     _avro_string(event_ids[row], "event_id"),
                     _varint_long(operator.index(event_timestamps[row]))]
            n = kept_counts[row]
            if n:
                parts.append(_varint_long(n))  # one block holding every item
                base = row * k * 4
                rank = 0
                for col, index in enumerate(items_list[row]):
                    if all_kept or keep_list[row][col]:
                        rank += 1
                        at = base + col * 4
                        parts += (ids[index], packed[at:at + 4], ranks[rank])
            parts.append(b"\x00")  # end of the array (alone: an empty array)
            parts.append(tail)
            out.append(b"".join(parts))
        return out
