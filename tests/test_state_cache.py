"""The agent's model-thread cycle on the state cache, without Kafka: batches scored from the
cache, flushes written to a table (late, as the event loop writes them), users evicted and read
back, a cold worker going on from snapshots + the items since: every recommendation equals the
offline model stepped over that user's clicks."""

from types import SimpleNamespace

import pytest
import torch

from schemas.codec import decode_interaction, decode_recommendation, encode_interaction
from streams.shared.config import StreamConfig
from streams.worker.agents import ScoringAgent
from streams.worker.scoring import Event, Scorer, UserRecord, snapshot_key
from streams.worker.state_cache import StateCache
from tests.test_scoring import ITEM_IDS, N_ITEMS, offline_top_k, small_model

PARTITIONS = 2


class DictTable:
    """The agent's table interface over a dict per partition."""

    def __init__(self):
        self.data = {p: {} for p in range(PARTITIONS)}
        self.written_bytes = 0
        self.found = 0                      # reads that found a record

    def write(self, partition, key, value):
        self.data[partition][key] = value
        self.written_bytes += len(key) + len(value)

    def read_many(self, partition, keys):
        values = [self.data[partition].get(k) for k in keys]
        self.found += sum(v is not None for v in values)
        return values


def clicks(n_users, per_user, seed=0, unknown_every=0):
    """Message events as Faust hands them over: user u on partition u % PARTITIONS; every
    unknown_every-th click on a title the model does not know."""
    g = torch.Generator().manual_seed(seed)
    out, offsets = [], [0] * PARTITIONS
    for step in range(per_user):
        for u in range(n_users):
            item = ITEM_IDS[int(torch.randint(1, N_ITEMS, (1,), generator=g))]
            if unknown_every and (step * n_users + u) % unknown_every == 0:
                item = f"new-title-{u}-{step}"
            user, partition = f"u{u}", u % PARTITIONS
            value = encode_interaction({"event_id": f"e{u}-{step}", "user_id": user,
                                        "item_id": item, "event_type": "CLICK",
                                        "timestamp": 1000 * step, "properties": None})
            message = SimpleNamespace(key=user.encode(), partition=partition,
                                      offset=offsets[partition])
            offsets[partition] += 1
            out.append(SimpleNamespace(value=value, message=message))
    return out


def make_agent(model, table, capacity=1000, snapshot_every=4, state_dtype=torch.float32):
    # As the worker runs it: the traced step, on rows that are views into the cache's block,
    # a few users at a time (step_rows; batches of 5 make blocks of 2, 2 and 1).
    scorer = Scorer(model, ITEM_IDS, "v1", state_dtype=state_dtype, trace_step=True,
                    step_rows=2)
    agent = ScoringAgent(StreamConfig(flush_every_s=3600, batch_max=2), scorer, None, None,
                         table)
    agent.cache = StateCache(agent.scorer.template, state_dtype, capacity, snapshot_every)
    return agent


def run(agent, table, events, batch=5, flush_every=2, write_lag=1, skip_writes=None):
    """Batches through agent.score; a flush every `flush_every` batches, written to the
    table `write_lag` batches later (the event loop is behind the model thread)."""
    recs, unwritten = [], []
    batches = [events[s:s + batch] for s in range(0, len(events), batch)]
    for number, messages in enumerate(batches):
        scored = agent.score(messages, number, flush=(number + 1) % flush_every == 0)
        recs += [decode_recommendation(value) for _, value in scored.recommendations]
        if scored.flush is not None:
            unwritten.append(scored.flush)
        while len(unwritten) > write_lag:
            write(agent, table, unwritten.pop(0))
    final = agent.score([], len(batches), flush=True)
    for flush in unwritten + [final.flush]:
        write(agent, table, flush, skip_writes)
    return recs


def write(agent, table, flush, skip=None):
    for partition, key, value in flush.writes:
        if skip is None or not skip(key):
            table.write(partition, key, value)
    agent.cache.flush_written(flush.number)


def assert_offline(model, recs, events):
    clicked = {}
    expected = {}
    for message in events:
        click = decode_interaction(message.value)
        read = clicked.setdefault(click["user_id"], [])
        if click["item_id"] in ITEM_IDS:        # an unknown title is left out of what is read
            read.append(ITEM_IDS.index(click["item_id"]))
        expected[click["event_id"]] = list(clicked[click["user_id"]])
    assert sorted(r["event_id"] for r in recs) == sorted(expected)
    for rec in recs:
        top, scores = offline_top_k(model, expected[rec["event_id"]])
        assert [ITEM_IDS.index(i["item_id"]) for i in rec["items"]] == top, rec["event_id"]
        assert torch.allclose(torch.tensor([i["score"] for i in rec["items"]]), scores,
                              atol=1e-4)


@pytest.mark.parametrize("capacity", [1000, 6], ids=["all-cached", "evicting"])
def test_cached_scoring_with_late_flushes_equals_the_offline_model(capacity):
    model, table = small_model(), DictTable()
    events = clicks(n_users=7, per_user=9)
    agent = make_agent(model, table, capacity=capacity)
    recs = run(agent, table, events, batch=3)
    assert_offline(model, recs, events)
    if capacity == 6:                       # users were evicted and read back
        assert len(agent.cache) <= 6 and table.found > 0


@pytest.mark.parametrize("capacity", [1000, 6], ids=["all-cached", "evicting"])
def test_titles_the_version_does_not_know_are_left_out_of_every_state(capacity):
    """Every 4th click (some users' first) is on an unknown title: the step, the replay of a
    snapshot's pending items after an eviction and after a cold restart all leave it out, so
    each recommendation equals the offline model over the user's known items only (over one
    unknown item where there is none yet)."""
    model, table = small_model(), DictTable()
    events = clicks(n_users=7, per_user=9, unknown_every=4)
    recs = run(make_agent(model, table, capacity=capacity), table, events[:40], batch=3)
    recs += run(make_agent(model, table, capacity=capacity), table, events[40:], batch=3)
    assert_offline(model, recs, events)


def test_a_cold_worker_goes_on_from_snapshots_and_the_items_since():
    model, table = small_model(), DictTable()
    events = clicks(n_users=5, per_user=11)
    first, second = events[:31], events[31:]
    recs = run(make_agent(model, table, snapshot_every=4), table, first)
    records = [UserRecord.from_bytes(v) for p in table.data.values()
               for k, v in p.items() if not k.endswith(b"\xff")]
    # Some users are between snapshots: their state is a snapshot plus items replayed.
    assert any(0 < r.events_applied - r.snapshot_at < 4 for r in records)
    assert all(r.state == b"" for r in records)
    recs += run(make_agent(model, table, snapshot_every=4), table, second)
    assert_offline(model, recs, events)


def test_a_crash_between_a_record_and_its_snapshot_keeps_the_state_exact():
    """The last flush's snapshots never reach the table (the records did): the older
    snapshots, and the history reaching back to them, give the same states."""
    model, table = small_model(), DictTable()
    events = clicks(n_users=3, per_user=14)
    first, second = events[:30], events[30:]
    agent = make_agent(model, table, snapshot_every=4)
    recs = run(agent, table, first, flush_every=100, write_lag=0)   # one flush at the end...
    run_state = dict(table.data[0])
    assert any(k.endswith(b"\xff") for k in run_state)
    # ... and again, now with the last flush's snapshots lost.
    table2 = DictTable()
    agent2 = make_agent(model, table2, snapshot_every=4)
    run(agent2, table2, events[:15], flush_every=100, write_lag=0)
    run(agent2, table2, events[15:30], flush_every=100, write_lag=0,
        skip_writes=lambda key: key.endswith(b"\xff"))
    recs2 = run(make_agent(model, table2, snapshot_every=4), table2, second)
    assert_offline(model, recs + recs2, events)


def test_a_record_written_by_the_previous_version_still_reads():
    """Before the cache, every record embedded its state: such records go on exactly, and
    the first flush moves the state to a snapshot."""
    model, table = small_model(), DictTable()
    events = clicks(n_users=4, per_user=6)
    scorer = Scorer(model, ITEM_IDS, "v1")
    old = []
    for message in events[:12]:
        click = decode_interaction(message.value)
        old.append(Event(click["user_id"], click["item_id"], click["event_id"], 0,
                         message.message.partition, message.message.offset))
    updated, recs, _ = scorer.process(old, {e.user_id: None for e in old})
    for user, record in updated.items():
        assert record.state                                 # the old layout: state inside
        table.write(int(user[1:]) % PARTITIONS, user.encode(), record.to_bytes())
    recs = [dict(r) for r in recs]
    more = run(make_agent(model, table), table, events[12:])
    assert_offline(model, recs + more, events)
    heads = [UserRecord.from_bytes(table.data[int(u[1:]) % PARTITIONS][u.encode()])
             for u in updated]
    assert all(h.state == b"" and h.snapshot_at >= 0 for h in heads)
    assert all(snapshot_key(u.encode()) in table.data[int(u[1:]) % PARTITIONS]
               for u in updated)


def test_bytes_written_per_click_are_a_fraction_of_the_state():
    model, table = small_model(), DictTable()
    events = clicks(n_users=4, per_user=40)
    agent = make_agent(model, table, snapshot_every=16)
    run(agent, table, events, batch=8, flush_every=4)
    state_bytes = sum(t[0].numel() for t in agent.scorer.template.values()) * 4
    per_click = table.written_bytes / len(events)
    assert per_click < state_bytes / 8, (per_click, state_bytes)


def test_half_precision_states_stay_within_the_documented_error():
    model, table = small_model(), DictTable()
    events = clicks(n_users=3, per_user=8)
    recs = run(make_agent(model, table, state_dtype=torch.float16), table, events)
    by_event = {r["event_id"]: r for r in recs}
    clicked = {}
    for message in events:
        click = decode_interaction(message.value)
        read = clicked.setdefault(click["user_id"], [])
        if click["item_id"] in ITEM_IDS:        # an unknown title is left out of what is read
            read.append(ITEM_IDS.index(click["item_id"]))
        _, scores = offline_top_k(model, clicked[click["user_id"]])
        got = torch.tensor([i["score"] for i in by_event[click["event_id"]]["items"]])
        assert torch.allclose(got, scores, atol=2e-2)


def test_a_snapshot_interval_the_history_cannot_cover_is_refused():
    with pytest.raises(ValueError, match="snapshot_every"):
        StateCache(None, torch.float32, 10, snapshot_every=26)


def test_a_flush_is_due_once_flush_max_users_are_dirty_or_half_the_cache():
    cache = StateCache(None, torch.float32, capacity=100, flush_max_users=3)
    for u in range(3):
        cache.add(f"u{u}", UserRecord(), 0, None)
        assert not cache.needs_flush()
        cache.mark_dirty(f"u{u}")
    assert cache.needs_flush()
    assert cache.flush().users == 3 and not cache.needs_flush()
    roomy = StateCache(None, torch.float32, capacity=10, flush_max_users=1000)
    for u in range(6):
        roomy.add(f"u{u}", UserRecord(), 0, None)
        roomy.mark_dirty(f"u{u}")
    assert roomy.needs_flush()                              # more than half the rows
    with pytest.raises(ValueError, match="flush_max_users must be at least 1, not 0"):
        StateCache(None, torch.float32, 10, flush_max_users=0)


def test_versions_announced_between_two_batches_keep_the_lineage():
    """v2 (child of v1) and v3 (child of v2) both arrive before the next batch: only v3 is
    served, and states started by v1 are still those of an ancestor (kept, not rebuilt)."""
    scorer = Scorer(small_model(), ITEM_IDS, "v1", keep_states_for_versions=5)
    agent = ScoringAgent(StreamConfig(), scorer, None, None, None)
    agent.serve_next(small_model(), ITEM_IDS, "v2", parent="v1")
    agent.serve_next(small_model(), ITEM_IDS, "v3", parent="v2")
    agent.score([], 0)
    assert scorer.version == "v3" and scorer.lineage == {"v3": 0, "v1": 1}


def test_a_swap_to_another_state_shape_flushes_the_swap_batchs_users_too():
    """The clicks of the batch that swaps are acked with that batch's flush: their users'
    records must be in it, not left dirty in the new cache."""
    model, table = small_model(), DictTable()
    agent = make_agent(model, table)
    events = clicks(n_users=3, per_user=4)
    agent.score(events[:6], 0)
    torch.manual_seed(1)
    from model.models import build_model
    other = build_model("mlsa4rec-s", N_ITEMS, {"hidden": 16, "max_len": 20}).eval()
    agent.serve_next(other, ITEM_IDS, "v2")
    scored = agent.score(events[6:9], 1)
    assert scored.flush is not None and not agent.cache.dirty
    written = {key for _, key, _ in scored.flush.writes}
    assert {b"u0", b"u1", b"u2"} <= written


def test_a_user_with_a_snapshot_every_flush_keeps_a_bounded_history():
    model, table = small_model(), DictTable()
    agent = make_agent(model, table, snapshot_every=4)
    events = clicks(n_users=1, per_user=200)
    for start in range(0, 200, 20):                     # 20 clicks a flush, written at once
        scored = agent.score(events[start:start + 20], start, flush=True)
        write(agent, table, scored.flush)
    record = UserRecord.from_bytes(table.data[0][b"u0"])
    assert record.events_applied == 200 and len(record.history) <= 50 + 20


def test_a_snapshot_of_another_lineage_under_the_key_is_rebuilt_not_replayed():
    """A crash between a rebuilt user's record and its new snapshot leaves the old lineage's
    snapshot under the key: the state is rebuilt from the history, not the old one stepped."""
    from streams.worker.scoring import BatchStats, snapshot_to_bytes
    from model.state import states_to_bytes
    model = small_model()
    scorer = Scorer(model, ITEM_IDS, "v2")
    old_state = states_to_bytes(model.init_state(1))[0]
    record = UserRecord(model_version="v2", snapshot_at=4, events_applied=6,
                        history=["item1", "item2", "item3", "item4", "item5", "item6"])
    stats = BatchStats()
    scorer.load(["u"], {"u": record}, {"u": snapshot_to_bytes(4, "v-old", old_state)}, stats)
    assert stats.rebuilt_states == 1
    stats = BatchStats()
    record.snapshot_at = 4
    scorer.load(["u"], {"u": record}, {"u": snapshot_to_bytes(4, "v2", old_state)}, stats)
    assert stats.rebuilt_states == 0                    # its own lineage: replayed


def test_a_window_models_cache_is_bounded_too():
    cache = StateCache(None, torch.float32, capacity=4)
    for u in range(10):
        cache.add(f"u{u}", UserRecord(), 0, None)
    assert len(cache) == 4


def test_recommendations_go_out_while_a_flush_is_written_and_acks_wait_for_it():
    """The writer task: a flush the table has not acknowledged yet holds up neither the next
    batches nor their recommendations, only the acks (the offsets Faust may commit) of the
    events it covers; those come, in order, once it is written."""
    import asyncio

    async def scenario():
        release = asyncio.Event()
        table, sent, acked = DictTable(), [], []

        class SlowTable:
            read_many = table.read_many

            async def write(self, writes):
                await release.wait()
                for partition, key, value in writes:
                    table.write(partition, key, value)

        class Recommendations:
            async def send(self, key, value):
                sent.append(decode_recommendation(value)["event_id"])
                done = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done

        async def ack(message_event):
            acked.append(message_event.message.offset)

        scorer = Scorer(small_model(), ITEM_IDS, "v1", trace_step=True)
        cfg = StreamConfig(flush_every_s=3600, batch_max=2, batch_wait_ms=1,
                           flush_max_users=1)          # every batch ends with a flush
        agent = ScoringAgent(cfg, scorer, Recommendations(), None, SlowTable())
        stream = SimpleNamespace(channel=SimpleNamespace(queue=asyncio.Queue()), ack=ack)
        # 10 clicks, 5 batches, 5 flushes. Written in the finisher, the first flush would hold
        # it, two batches would wait in its queue (--pipeline-depth) and a fourth to be put
        # there: the fifth never scored. With the writer a flush waits in line behind it.
        events = clicks(n_users=2, per_user=5)
        task = asyncio.ensure_future(agent.run(stream))

        async def until(condition):
            while not condition():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.01)

        for message_event in events:
            stream.channel.queue.put_nowait(message_event)
        await asyncio.wait_for(until(lambda: len(sent) == 10), 30)
        assert acked == [] and agent.cache.written() == 0
        release.set()
        await asyncio.wait_for(until(lambda: len(acked) == 10), 30)
        assert sorted(sent) == sorted(f"e{u}-{s}" for u in range(2) for s in range(5))
        assert agent.cache.written() == 5
        task.cancel()

    asyncio.run(scenario())
