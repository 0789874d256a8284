"""Overlapped batches: batches scored from table reads that earlier batches' writes may not
show yet (streams/worker/pipeline.py), in the orders the agent can produce."""

import pytest

from streams.worker.agents import ScoringAgent
from streams.shared.config import StreamConfig
from streams.worker.pipeline import UnwrittenRecords
from streams.worker.scoring import Scorer, UserRecord
from tests.test_scoring import ITEM_IDS, make_events, run_in_batches, small_model


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_scoring_ahead_of_the_table_writes_equals_scoring_in_turn(depth):
    """Batch k reads the table while the `depth` batches before it are still unwritten, and
    is scored after some of those writes land: the worst interleaving of the agent."""
    events = make_events(n_users=3, per_user=10)
    scorer = Scorer(small_model(), ITEM_IDS, "v1")
    expected_table, expected = run_in_batches(scorer, events, 3)

    unwritten, table, out, pending = UnwrittenRecords(), {}, [], []
    written = 0                                        # batches whose records are in `table`
    batches = [events[s:s + 3] for s in range(0, len(events), 3)]
    for number, batch in enumerate(batches):
        read_after = written                           # the table read happens now ...
        read = {e.user_id: (UserRecord.from_bytes(table[e.user_id]) if e.user_id in table
                            else None) for e in batch}
        while len(pending) > depth - 1:                # ... an earlier batch is written ...
            table.update({u: r.to_bytes() for u, r in pending.pop(0).items()})
            written += 1
        # ... and only then is this batch scored.
        updated, recs, _ = scorer.process(batch, unwritten.overlay(read, read_after))
        unwritten.add(updated, number)
        out += recs
        pending.append(updated)
    for updated in pending:
        table.update({u: r.to_bytes() for u, r in updated.items()})

    assert [r["items"] for r in out] == [r["items"] for r in expected]
    assert table == expected_table


def test_an_entry_is_kept_while_a_batch_may_have_read_around_its_write():
    unwritten = UnwrittenRecords()
    unwritten.add({"u": UserRecord(last_offset=5)}, batch=3)
    stale = {"u": UserRecord(last_offset=1)}
    # Read when 3 batches were written (batch 3 not among them): the entry wins, as a copy.
    (record,) = unwritten.overlay(stale, read_after=3).values()
    assert record.last_offset == 5
    assert len(unwritten) == 1
    # Read after batch 3 was written: the table's record is current; the entry is dropped.
    fresh = {"u": UserRecord(last_offset=5)}
    assert unwritten.overlay(fresh, read_after=4)["u"] is fresh["u"]
    assert len(unwritten) == 0


def test_versions_announced_between_two_batches_keep_the_lineage():
    """v2 (child of v1) and v3 (child of v2) both arrive before the next batch: only v3 is
    served, and states started by v1 are still those of an ancestor (kept, not rebuilt)."""
    scorer = Scorer(small_model(), ITEM_IDS, "v1", keep_states_for_versions=5)
    agent = ScoringAgent(StreamConfig(), scorer, None, None, None)
    agent.serve_next(small_model(), ITEM_IDS, "v2", parent="v1")
    agent.serve_next(small_model(), ITEM_IDS, "v3", parent="v2")
    agent.score([], {}, read_after=0, number=0)
    assert scorer.version == "v3" and scorer.lineage == {"v3": 0, "v1": 1}
