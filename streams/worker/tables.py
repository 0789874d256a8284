"""The per-user state table, and per-event access to it from a batch.

Faust picks a table partition (its RocksDB database and changelog partition) from the
*current event*. Inside `stream.take_events` the current event is not the one whose user we
touch, so every read and write goes through `as_current(event)`, which sets it as Faust does
for a single event.
"""

from __future__ import annotations

import contextlib
import weakref

import rocksdict
from faust.stores import STORES
from faust.stores.rocksdb import Store as RocksDBStore
from faust.streams import _current_event

STATE_TABLE = "user-state"
# The path names the table's databases (<datadir>/v1/tables/user-state-<partition>.db, as
# "rocksdb://" would); a URL without one would also be falsy to Faust, which then ignores it.
STORE_URL = f"rocksdb-changelog:{STATE_TABLE}"


class ChangelogBackedStore(RocksDBStore):
    """Faust's RocksDB store, minus RocksDB's own write-ahead log.

    The table's changelog topic is the durable copy; the local database is a cache of it, as in
    Kafka Streams, which turns the log off for the same reason. Without the log a crash loses the
    writes not yet flushed from the memtable, and with them the changelog offset stored beside
    them: the database comes back as it was at its last flush, and Faust's recovery reads the
    changelog from that offset on, restoring the rest (tests/test_stream_e2e.py: SIGKILL, then a
    restart on the same folder). Each state write is ~33-66 KB, written a second time to the log:
    dropping it measured +12% events/s (docs/RESULTS.md, section 4). A clean stop flushes.
    """

    def _open_for_partition(self, partition: int):
        db = super()._open_for_partition(partition)
        write_options = rocksdict.WriteOptions()
        write_options.disable_wal = True
        db.set_write_options(write_options)
        return db


STORES.aliases.setdefault(STORE_URL.split(":")[0], f"{__name__}:ChangelogBackedStore")


def user_state_table(app, partitions: int, cache_mb: int = 64, write_buffer_mb: int = 16):
    """bytes key and value types make Faust store them raw (no JSON). RocksDB memory is
    bounded per partition: Faust's defaults (a 2 GB block cache and 3 x 64 MB write buffers
    for each partition's database) let a worker's memory climb for many minutes."""
    return app.Table(STATE_TABLE, default=None, key_type=bytes, value_type=bytes,
                     partitions=partitions, store=STORE_URL,
                     options={"block_cache_size": cache_mb * 2 ** 20,
                              "block_cache_compressed_size": cache_mb * 2 ** 20 // 4,
                              "write_buffer_size": write_buffer_mb * 2 ** 20,
                              "max_write_buffer_number": 2})


class StateTable:
    """The agent's view of the table: writes through Faust (RocksDB and the changelog, under
    the partition of the event made current), reads straight from the partition's RocksDB
    database, many keys in one multi-get (Faust reads one key per call, by the current
    event). Reads come from the model thread: RocksDB is safe to read while the event loop
    writes, and a partition's database is open from its recovery on."""

    def __init__(self, table):
        self.table = table

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.table[key] = value

    def read_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        return self.table.data._db_for_partition(partition).get(keys)


@contextlib.contextmanager
def as_current(event):
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)
