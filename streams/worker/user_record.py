"""A user's record in the `user-state` table: what the worker knows of the user besides its
state snapshot (offsets, the last items, the versions), and its bytes.

Written once per flush for every user a flush covers, so its encoding is on the worker's hot
path: a flush of 2,000 users spent two thirds of its time in `json.dumps` (docs/RESULTS.md 4k).
The bytes are therefore binary:

    0x01, flags, five int64 (last_offset, events_applied, unknown_items, snapshot_at,
    last_event_time), five uint32 lengths (model_version, last_event_id, offsets_of,
    last_version, the history's bytes), the history's item count (uint32), the extension's
    length (uint32); then those strings (UTF-8), the history, the extension, the state.

The history is its items joined by NUL, or (flag 1: an item holds a NUL) a uint32 length per
item before the items. The extension is a JSON object of fields this version does not know,
where a later version puts the fields it adds: this version drops them, and fields a record
lacks take their defaults. Records of earlier versions (a 4-byte length, then a JSON header:
their first byte is 0) still read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields

NO_SNAPSHOT = -1

_BINARY = 1
_JOINED_HISTORY, _SIZED_HISTORY = 0, 1
_HEAD = struct.Struct(">BBqqqqqIIIIIII")


@dataclass
class UserRecord:
    model_version: str = ""
    state: bytes = b""
    last_offset: int = -1
    last_event_id: str = ""
    offsets_of: str = ""            # the topic (its Kafka topic id) last_offset counts in
    history: list[str] = field(default_factory=list)
    events_applied: int = 0
    unknown_items: int = 0
    # events_applied when the snapshot under snapshot_key(user) was taken; 0 = the model's
    # initial state (nothing stored); NO_SNAPSHOT = the state is in `state`, or there is none.
    snapshot_at: int = NO_SNAPSHOT
    last_version: str = ""          # the version whose step applied the last event
    last_event_time: int = 0        # that event's timestamp (ms)

    def to_bytes(self) -> bytes:
        history = self.history
        joined = "\0".join(history).encode()
        flags = _JOINED_HISTORY
        if history and joined.count(b"\0") != len(history) - 1:     # an item holds a NUL
            items = [item.encode() for item in history]
            joined = struct.pack(f">{len(items)}I", *map(len, items)) + b"".join(items)
            flags = _SIZED_HISTORY
        strings = (self.model_version.encode(), self.last_event_id.encode(),
                   self.offsets_of.encode(), self.last_version.encode())
        head = _HEAD.pack(_BINARY, flags, self.last_offset, self.events_applied,
                          self.unknown_items, self.snapshot_at, self.last_event_time,
                          *map(len, strings), len(joined), len(history), 0)
        return b"".join((head, *strings, joined, self.state))

    @classmethod
    def from_bytes(cls, data: bytes) -> "UserRecord":
        """ValueError if the bytes are no record of any version."""
        if len(data) < 4:
            raise ValueError(f"user record of {len(data)} bytes: too short")
        if data[0] == 0:
            return cls._from_json_header(data)
        if data[0] != _BINARY or len(data) < _HEAD.size:
            raise ValueError(f"user record in an unknown format (first byte {data[0]}, "
                             f"{len(data)} bytes)")
        (_, flags, last_offset, events_applied, unknown_items, snapshot_at, last_event_time,
         *lengths, count, extension) = _HEAD.unpack_from(data)
        if flags not in (_JOINED_HISTORY, _SIZED_HISTORY):
            raise ValueError(f"user record with unknown flags {flags}")
        at, parts = _HEAD.size, []
        for n in lengths:
            parts.append(bytes(data[at:at + n]))
            at += n
        at += extension         # only fields of later versions: skipped
        if at > len(data):
            raise ValueError(f"user record of {len(data)} bytes: truncated (needs {at})")
        model_version, last_event_id, offsets_of, last_version = (p.decode() for p in parts[:4])
        return cls(model_version=model_version, state=bytes(data[at:]),
                   last_offset=last_offset, last_event_id=last_event_id,
                   offsets_of=offsets_of, history=_history(parts[4], count, flags),
                   events_applied=events_applied, unknown_items=unknown_items,
                   snapshot_at=snapshot_at, last_version=last_version,
                   last_event_time=last_event_time)

    @classmethod
    def _from_json_header(cls, data: bytes) -> "UserRecord":
        """A record of an earlier version: a 4-byte header length, a JSON header, the state."""
        (n,) = struct.unpack_from(">I", data)
        header = json.loads(data[4:4 + n])
        known = {f.name for f in fields(cls)} - {"state"}
        return cls(state=bytes(data[4 + n:]), **{k: v for k, v in header.items() if k in known})


def _history(data: bytes, count: int, flags: int) -> list[str]:
    if count == 0:
        return []
    if flags == _JOINED_HISTORY:
        return data.decode().split("\0")
    sizes = struct.unpack_from(f">{count}I", data)
    at, items = 4 * count, []
    for n in sizes:
        items.append(data[at:at + n].decode())
        at += n
    return items
