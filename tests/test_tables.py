"""The state table's store: Faust's RocksDB store without RocksDB's write-ahead log."""

from __future__ import annotations

import faust

from streams.worker.tables import ChangelogBackedStore, user_state_table


def test_state_writes_skip_the_write_ahead_log_and_a_clean_close_keeps_them(tmp_path):
    app = faust.App("tables-test", store="rocksdb://", datadir=str(tmp_path))
    table = user_state_table(app, partitions=2)
    store = table.data
    assert isinstance(store, ChangelogBackedStore)
    db = store._db_for_partition(0)
    for n in range(20):
        db.put(f"user-{n}".encode(), bytes(50_000))               # 1 MB of state records
    path = store.partition_path(0)
    wal = sum(f.stat().st_size for f in path.glob("*.log"))
    assert wal < 10_000, f"{wal} bytes in the write-ahead log"
    db.close()
    reopened = store._open_for_partition(0)                       # flushed on close
    assert reopened.get(b"user-19") == bytes(50_000)
    reopened.close()
