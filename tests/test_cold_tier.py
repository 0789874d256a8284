"""The cold tier (streams/worker/cold_tier.py) on the agent's model-thread cycle: a user idle
longer than cold_after by event time loses its snapshot (table and compacted changelog) and its
next click is the offline model's prefill of its last 50 items; a user not idle stays exact; a
sweep cut short by a crash loses nothing and a repeated one changes nothing. Then the sweep's
writes through the real RocksDB table: a tombstone in the changelog, the key gone locally; and
a real worker on the real broker (the fixtures of tests/test_stream_e2e.py)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import faust
import pytest
import torch

from schemas.codec import decode_recommendation, encode_interaction
from streams.shared.config import StreamConfig
from streams.worker.agents import ScoringAgent
from streams.worker.cold_tier import ColdSweep, is_cold
from streams.worker.scoring import Scorer, UserRecord, snapshot_key
from streams.worker.tables import StateTable, user_state_table
from tests.test_scoring import ITEM_IDS, N_ITEMS, offline_top_k, small_model
from tests.test_state_cache import PARTITIONS, DictTable, make_agent, write
from tests.test_stream_e2e import checkpoint  # noqa: F401 - the fixture

IDLE_S = 1000.0


class ChangelogTable(DictTable):
    """DictTable with the parts the sweep uses: deletes, a key-order scan, and the changelog
    every write went to (compacted: the last value per key, tombstones removing it)."""

    def __init__(self):
        super().__init__()
        self.changelog = {p: [] for p in range(PARTITIONS)}

    def write(self, partition, key, value):
        self.changelog[partition].append((key, value))
        if value is None:
            self.data[partition].pop(key, None)
        else:
            super().write(partition, key, value)

    def scan(self, partition, start, limit):
        keys = sorted(k for k in self.data[partition] if k >= start)
        return keys[:limit], (keys[limit] if len(keys) > limit else None)

    def is_open(self, partition):
        return True

    def compacted(self, partition):
        out = {}
        for key, value in self.changelog[partition]:
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return out


def click(user: str, n: int, item: int, seconds: float, offsets: dict):
    """A message event of `user` (partition 0 for users starting with "a"/"b", else 1)."""
    partition = 0 if user[0] in "ab" else 1
    value = encode_interaction({"event_id": f"{user}-{n}", "user_id": user,
                                "item_id": ITEM_IDS[item], "event_type": "CLICK",
                                "timestamp": int(seconds * 1000), "properties": None})
    offset = offsets[partition] = offsets.get(partition, -1) + 1
    message = SimpleNamespace(key=user.encode(), partition=partition, offset=offset)
    return SimpleNamespace(value=value, message=message)


def score_all(agent, table, messages, start=0, batch=4):
    """Batches through agent.score, each with a flush written at once; recs by event id."""
    recs = {}
    for n, s in enumerate(range(0, len(messages), batch)):
        if agent.cold is not None:          # the flush timer's scan, here before each batch
            agent.cold.scan(agent.table)
        scored = agent.score(messages[s:s + batch], start + n, flush=True)
        recs.update((r["event_id"], r) for r in map(decode_recommendation,
                                                     (v for _, v in scored.recommendations)))
        write(agent, table, scored.flush)
    return recs


def assert_top(model, rec, items):
    top, scores = offline_top_k(model, items)
    assert [ITEM_IDS.index(i["item_id"]) for i in rec["items"]] == top, rec["event_id"]
    assert torch.allclose(torch.tensor([i["score"] for i in rec["items"]]), scores, atol=1e-4)


def history(g, n):
    return [int(torch.randint(1, N_ITEMS, (1,), generator=g)) for _ in range(n)]


def cold_agent(model, table):
    agent = make_agent(model, table, snapshot_every=4)
    agent.cold = ColdSweep(IDLE_S, agent.scorer.history_len, keys_per_flush=64)
    return agent


def test_an_idle_user_goes_cold_and_comes_back_as_the_prefill_of_its_last_50_items():
    model, table = small_model(), ChangelogTable()
    g = torch.Generator().manual_seed(0)
    a, b, c = history(g, 70), history(g, 70), history(g, 10)
    offsets: dict = {}
    # a clicks 70 times, then is idle; b goes on clicking past a's last click + IDLE_S; c is
    # as idle as a, but alone in partition 1, whose clock stops at its own last click.
    first = [click("a", n, i, n, offsets) for n, i in enumerate(a)]
    first += [click("c", n, i, n, offsets) for n, i in enumerate(c)]
    first += [click("b", n, i, 100 + n * 20, offsets) for n, i in enumerate(b)]
    agent = cold_agent(model, table)
    recs = score_all(agent, table, first)
    for n in range(len(b)):                         # not idle: exact, over its whole history
        assert_top(model, recs[f"b-{n}"], b[:n + 1])
    stored = {k: UserRecord.from_bytes(v) for k, v in table.data[0].items()
              if not k.endswith(b"\xff")}
    assert is_cold(stored[b"a"]) and stored[b"a"].history == [ITEM_IDS[i] for i in a[-50:]]
    assert stored[b"a"].events_applied == 70 and stored[b"a"].last_offset == 69
    assert snapshot_key(b"a") not in table.data[0]
    assert snapshot_key(b"a") not in table.compacted(0)             # a restore keeps it gone
    assert (None in [v for k, v in table.changelog[0] if k == snapshot_key(b"a")])
    assert not is_cold(stored[b"b"]) and snapshot_key(b"b") in table.compacted(0)
    assert snapshot_key(b"c") in table.data[1]                      # its partition's clock
    assert "a" not in agent.cache.entries and agent.cold.made_cold == 1
    # a comes back, to this worker and to a restarted one (read from the table): its state is
    # the prefill of its last 50 items, then its new clicks; b's stays exact.
    restarted_table = ChangelogTable()
    restarted_table.data = {p: dict(d) for p, d in table.data.items()}
    again = [click("a", 70, 5, 5000, offsets), click("a", 71, 6, 5001, offsets),
             click("b", 70, 7, 5000, offsets)]
    # (the prefill is not the state over the whole history: the check below tells them apart)
    assert not torch.allclose(offline_top_k(model, a + [5])[1], offline_top_k(model, a[-50:] + [5])[1], atol=1e-3)
    for worker, its_table in ((agent, table), (cold_agent(model, restarted_table),
                                               restarted_table)):
        recs = score_all(worker, its_table, again, start=100)
        assert_top(model, recs["a-70"], a[-50:] + [5])
        assert_top(model, recs["a-71"], a[-50:] + [5, 6])
        assert_top(model, recs["b-70"], b + [7])
        assert snapshot_key(b"a") in its_table.data[0]          # hot again: a new snapshot


def test_a_sweep_cut_short_by_a_crash_loses_nothing_and_a_repeated_one_changes_nothing():
    model, table = small_model(), ChangelogTable()
    g = torch.Generator().manual_seed(1)
    a, b = history(g, 60), history(g, 10)
    offsets: dict = {}
    first = [click("a", n, i, n, offsets) for n, i in enumerate(a)]
    first += [click("b", n, i, 5000 + n, offsets) for n, i in enumerate(b)]
    score_all(make_agent(model, table, snapshot_every=4), table, first)   # no cold tier yet
    before = UserRecord.from_bytes(table.data[0][b"a"])
    assert snapshot_key(b"a") in table.data[0]
    sweep = ColdSweep(IDLE_S, 50)
    sweep.clock[0] = 5009 * 1000                          # b's last click
    sweep.scan(table)
    writes = sweep.sweep(table, make_agent(model, table).cache)
    # The record first, then the snapshot's delete; b (not idle) is left alone.
    assert [(k, v is None) for _, k, v in writes] == [(b"a", False), (snapshot_key(b"a"), True)]
    cold = UserRecord.from_bytes(writes[0][2])
    assert is_cold(cold) and cold.history == before.history[-50:]
    assert (cold.events_applied, cold.last_offset, cold.last_event_id) == \
        (before.events_applied, before.last_offset, before.last_event_id)
    # Twice (a changelog replayed, a sweep repeated after a crash before its writes): the same.
    once = ChangelogTable()
    once.data = {p: dict(d) for p, d in table.data.items()}
    for partition, key, value in writes + writes:
        table.write(partition, key, value)
    for partition, key, value in writes:
        once.write(partition, key, value)
    assert table.data == once.data
    sweep.scan(once)
    assert sweep.sweep(once, make_agent(model, once).cache) == []           # nothing left
    # A crash between the record and the delete: the snapshot stays, nothing reads it, the
    # next sweep that passes its key deletes it, and a's next click is the prefill.
    crashed = ChangelogTable()
    crashed.data = {p: dict(d) for p, d in table.data.items()}
    crashed.data[0][snapshot_key(b"a")] = b"left by the crash"
    agent = cold_agent(model, crashed)
    score_all(agent, crashed, [click("b", 10, 3, 5010, offsets),    # the clock, then a scan
                               click("b", 11, 3, 5011, offsets)], start=50, batch=1)
    assert snapshot_key(b"a") not in crashed.data[0]
    recs = score_all(agent, crashed, [click("a", 60, 4, 5012, offsets)], start=60)
    assert_top(model, recs["a-60"], a[-50:] + [4])


def test_a_dirty_user_is_never_swept_and_a_clean_cached_one_leaves_the_cache():
    model, table = small_model(), ChangelogTable()
    offsets: dict = {}
    agent = cold_agent(model, table)
    score_all(agent, table, [click("a", 0, 1, 0, offsets), click("b", 0, 2, 1, offsets)])
    agent.score([click("a", 1, 3, 2, offsets)], 10)        # a: dirty (no flush yet)
    agent.cold.clock[0] = 10 ** 9
    agent.cold.scan(table)
    writes = agent.cold.sweep(table, agent.cache)
    assert [k for _, k, _ in writes] == [b"b", snapshot_key(b"b")]
    assert "b" not in agent.cache.entries and agent.cache.entries["a"].dirty


def test_negative_idle_time_is_refused():
    scorer = Scorer(small_model(), ITEM_IDS, "v1")
    with pytest.raises(ValueError, match="cold_after_s"):
        ScoringAgent(StreamConfig(cold_after_s=-1), scorer, None, None, None)


class RecordingProducer:
    def __init__(self):
        self.sent = []

    async def send_to_partitions(self, topic, writes):
        self.sent += [(topic, *w) for w in writes]
        return {p: len(self.sent) for p, _, _ in writes}


def test_the_sweeps_writes_on_the_rocksdb_table_tombstone_the_changelog(tmp_path):
    app = faust.App("cold-tier-test", store="rocksdb://", datadir=str(tmp_path))
    producer = RecordingProducer()
    table = StateTable(user_state_table(app, partitions=2), producer)
    db = table.store._db_for_partition(0)
    hot = UserRecord(history=["x"] * 60, events_applied=60, snapshot_at=56, last_event_time=1)
    asyncio.run(table.write([(0, b"u", hot.to_bytes()), (0, snapshot_key(b"u"), b"s" * 5000)]))
    sweep = ColdSweep(IDLE_S, 50)
    sweep.clock[0] = 10 ** 9
    agent_cache = make_agent(small_model(), table).cache
    keys, _ = table.scan(0, b"", 100)
    assert keys == [b"u", snapshot_key(b"u")]               # Faust's offset key left out
    sweep.scan(table)
    writes = sweep.sweep(table, agent_cache)
    asyncio.run(table.write(writes))
    changelog = [(key, value) for _, _, key, value in producer.sent]
    assert changelog[-2:] == [(b"u", writes[0][2]), (snapshot_key(b"u"), None)]
    assert db.get(snapshot_key(b"u")) is None and is_cold(UserRecord.from_bytes(db.get(b"u")))
    assert table.scan(1, b"", 100) == ([], None)            # not open here: not opened
    assert 1 not in table.store._dbs
    db.close()


def test_a_real_worker_makes_an_idle_user_cold_and_tombstones_its_snapshot_in_the_changelog(
        kafka_bootstrap_server, checkpoint, tmp_path):
    """`mlsa4rec worker --cold-after-s 60` on the real broker: the idle user's snapshot key
    ends in a tombstone in the changelog (gone from its compacted view) and its next click is
    the offline prefill of its last 50 items; its partition's other user stays exact."""
    import uuid

    from confluent_kafka import Consumer

    from streams.shared.clients import produce_clicks
    from streams.worker.queries import partition_of
    from tests.test_stream_e2e import (ITEM_IDS as E2E_ITEMS, PARTITIONS as E2E_PARTITIONS,
                                       Worker, assert_matches_offline, collect,
                                       offline_expectation)
    path, model = checkpoint
    name = uuid.uuid4().hex[:8]
    worker = Worker(kafka_bootstrap_server, path, tmp_path, name)
    worker.args += ["--cold-after-s", "60", "--snapshot-every", "4"]
    idle_user = "user-idle"
    other = next(f"user-{n}" for n in range(100) if partition_of(f"user-{n}", E2E_PARTITIONS)
                 == partition_of(idle_user, E2E_PARTITIONS))
    t0 = 1_700_000_000_000

    def c(user, n, seconds):
        return {"event_id": f"{user}-{n}", "user_id": user, "item_id": E2E_ITEMS[1 + n * 7 % 29],
                "event_type": "CLICK", "timestamp": t0 + int(seconds * 1000), "properties": None}

    idle = [c(idle_user, n, n) for n in range(60)]
    others = [c(other, n, 30 + n * 40) for n in range(6)]          # up to t0 + 230 s
    comeback = [c(idle_user, 60, 300), c(other, 6, 300)]
    topic = f"interactions-{name}"
    changelog = f"scorer-{name}-user-state-changelog"
    snapshot = snapshot_key(idle_user.encode())
    worker.start()
    try:
        worker.wait_ready()
        produce_clicks(kafka_bootstrap_server, topic, idle + others)
        collect(kafka_bootstrap_server, f"recommendations-{name}",
                {e["event_id"] for e in idle + others})
        consumer = Consumer({"bootstrap.servers": kafka_bootstrap_server,
                             "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"})
        consumer.subscribe([changelog])
        log, deadline = [], time.monotonic() + 60
        while not any(k == snapshot and v is None for k, v in log):
            assert time.monotonic() < deadline, worker.log_tail()
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                log.append((msg.key(), msg.value()))
        consumer.close()
        compacted = {}
        for key, value in log:
            compacted[key] = value
        assert compacted[snapshot] is None                       # a restore does not keep it
        assert is_cold(UserRecord.from_bytes(compacted[idle_user.encode()]))
        assert compacted.get(snapshot_key(other.encode())) is not None
        produce_clicks(kafka_bootstrap_server, topic, comeback)
        got = collect(kafka_bootstrap_server, f"recommendations-{name}",
                      {e["event_id"] for e in comeback})
        prefill = offline_expectation(model, idle[-50:] + comeback[:1])
        exact = offline_expectation(model, others + comeback[1:])
        assert_matches_offline({k: got[k] for k in (comeback[0]["event_id"],)},
                               {comeback[0]["event_id"]: prefill[comeback[0]["event_id"]]})
        assert_matches_offline({comeback[1]["event_id"]: got[comeback[1]["event_id"]]},
                               {comeback[1]["event_id"]: exact[comeback[1]["event_id"]]})
        full = offline_expectation(model, idle + comeback[:1])[comeback[0]["event_id"]]
        assert not torch.allclose(full[1], prefill[comeback[0]["event_id"]][1], atol=1e-4)
    finally:
        worker.stop()
