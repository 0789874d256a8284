"""The per-user state table, and per-event access to it from a batch.

Faust picks a table partition (its RocksDB database and changelog partition) from the
*current event*. Inside `stream.take_events` the current event is not the one whose user we
touch, so every read and write goes through `as_current(event)`, which sets it as Faust does
for a single event.
"""

from __future__ import annotations

import contextlib
import weakref

from faust.streams import _current_event

STATE_TABLE = "user-state"


def user_state_table(app, partitions: int):
    # bytes key and value types make Faust store them raw (no JSON).
    return app.Table(STATE_TABLE, default=None, key_type=bytes, value_type=bytes,
                     partitions=partitions)


@contextlib.contextmanager
def as_current(event):
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)
