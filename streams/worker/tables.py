"""The per-user state table: Faust's RocksDB store without a write-ahead log, and the agent's
batched view of it (`StateTable`).

Faust owns the table's lifecycle: which partitions' databases are open on this worker, and
their recovery from the changelog topic after a restart or a rebalance."""

from __future__ import annotations

import rocksdict
from faust.types import TP
from faust.stores import STORES
from faust.stores.rocksdb import Store as RocksDBStore

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
    restart on the same folder). A state snapshot is 33-66 KB, which the log would write a second
    time (dropping it measured +12% events/s when every click wrote one). A clean stop flushes.
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
    """The agent's view of the `user-state` table: a flush's records go into each partition's
    RocksDB database in one write batch and to the table's changelog topic through the
    worker's confluent-kafka producer; reads come straight from the databases, many keys in
    one multi-get.

    Why not Faust's table API: each `table[key] = value` sends its changelog record through
    Faust's buffer and aiokafka, one Python round-trip per record, and Faust's conductor stops
    delivering events until that buffer is below 100 records: a flush of a few thousand
    users stalled the stream (p99 1.6 s at 200 clicks/s; docs/RESULTS.md, section 4c). The
    records are the ones Faust would write (same topic, partition, raw key and value), so its recovery reads
    them as its own; the changelog offset each database holds (where a restart resumes
    reading) is set once the broker has acknowledged them, as Faust does.

    Reads come from the model thread: RocksDB is safe to read while the event loop writes, and
    a partition's database is open from its recovery on."""

    def __init__(self, table, producer=None):
        self.table, self.producer = table, producer

    @property
    def store(self):
        return self.table.data

    def read_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        return self.store._db_for_partition(partition).get(keys)

    def is_open(self, partition: int) -> bool:
        """The partition's database is open on this worker (assigned, recovered)."""
        return partition in self.store._dbs

    def scan(self, partition: int, start: bytes, limit: int) -> tuple[list[bytes], bytes | None]:
        """Up to `limit` keys of a partition's database from `start` on, in key order, and the
        key to go on from (None: the end). Nothing for a partition not open on this worker."""
        db = self.store._dbs.get(partition)     # never _db_for_partition: that would open one
        if db is None:
            return [], None
        keys, it = [], db.iter()
        it.seek(start)
        while it.valid() and len(keys) < limit:
            key = bytes(it.key())
            if key != self.store.offset_key:        # Faust's changelog offset, no user's
                keys.append(key)
            it.next()
        return keys, (bytes(it.key()) if it.valid() else None)

    async def write(self, writes: list[tuple[int, bytes, bytes | None]]) -> None:
        """(partition, key, value) into the databases and the changelog; returns once the
        broker has acknowledged the changelog records. A value None deletes the key, with a
        tombstone in the changelog (what Faust's recovery applies as a delete)."""
        # The changelog first: a local database ahead of its changelog would keep records a
        # restart's recovery never re-sends (the clicks replayed after a failed send are then
        # skipped as applied). Until written, the agent reads these from its cache's flush.
        topic = self.table.changelog_topic.get_topic_name()
        offsets = await self.producer.send_to_partitions(topic, writes)
        batches: dict[int, rocksdict.WriteBatch] = {}
        for partition, key, value in writes:
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = rocksdict.WriteBatch(raw_mode=True)
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        for partition, batch in batches.items():
            self.store._db_for_partition(partition).write(batch)
        for partition, offset in offsets.items():
            self.store.set_persisted_offset(TP(topic, partition), offset)
