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


def user_state_table(app, partitions: int, cache_mb: int = 64, write_buffer_mb: int = 16):
    """bytes key and value types make Faust store them raw (no JSON). RocksDB memory is
    bounded per partition: Faust's defaults (a 2 GB block cache and 3 x 64 MB write buffers
    for each partition's database) let a worker's memory climb for many minutes."""
    return app.Table(STATE_TABLE, default=None, key_type=bytes, value_type=bytes,
                     partitions=partitions,
                     options={"block_cache_size": cache_mb * 2 ** 20,
                              "block_cache_compressed_size": cache_mb * 2 ** 20 // 4,
                              "write_buffer_size": write_buffer_mb * 2 ** 20,
                              "max_write_buffer_number": 2})


@contextlib.contextmanager
def as_current(event):
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)
