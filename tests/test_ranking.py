"""Blocked exact top k (model/ranking.py) against the full score matrix."""

from __future__ import annotations

import pytest
import torch

from model.ranking import top_k


def full_top_k(user_repr, weight, k, n_known, exclude=None):
    scores = user_repr @ weight.t()
    scores[:, 0] = -torch.inf
    scores[:, n_known:] = -torch.inf
    for row, items in enumerate(exclude or []):
        scores[row, items] = -torch.inf
    return torch.topk(scores, min(k, n_known - 1), dim=1)


@pytest.mark.parametrize("block", [1, 7, 1000, 4093, 50_000])
def test_blocked_top_k_equals_the_full_sort(block):
    g = torch.Generator().manual_seed(block)
    weight = torch.randn(10_050, 16, generator=g)
    user_repr = torch.randn(5, 16, generator=g)
    n_known = 10_007                                # rows after it: spare, never ranked
    exclude = [[], [3, 4, 5, 9_000], list(range(1, 500)), [], [10_006]]
    for ex in (None, exclude):
        scores, items = top_k(user_repr, weight, 10, n_known, block_items=block, exclude=ex)
        want_scores, want_items = full_top_k(user_repr, weight, 10, n_known, ex)
        assert torch.equal(items, want_items)
        assert torch.allclose(scores, want_scores)
    assert not (set(items[1].tolist()) & set(exclude[1]))
    assert all(1 <= i < n_known for i in items.flatten().tolist())


def test_k_beyond_the_catalogue_gives_every_item_once():
    weight = torch.randn(12, 4)
    scores, items = top_k(torch.randn(2, 4), weight, 50, n_known=9, block_items=4)
    assert items.shape == (2, 8)
    assert all(sorted(row) == list(range(1, 9)) for row in items.tolist())
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_a_bad_block_size_is_refused():
    with pytest.raises(ValueError, match="block_items must be at least 1"):
        top_k(torch.randn(1, 4), torch.randn(5, 4), 3, 5, block_items=0)


@pytest.mark.parametrize("trace_step", [False, True])
@pytest.mark.parametrize("name", ["mlsa4rec-s", "sasrec"])
def test_a_scorer_ranking_block_by_block_gives_the_same_recommendations(name, trace_step):
    from model.models import build_model
    from streams.worker.scoring import USER_REPR, BatchStats, Event, Scorer

    torch.manual_seed(0)
    n_items = 40
    item_ids = ["[PAD]"] + [f"movie-{i}" for i in range(1, n_items)]
    model = build_model(name, n_items, {"hidden": 16}).eval()
    g = torch.Generator().manual_seed(3)
    events = [Event(f"u{u}", item_ids[int(torch.randint(1, n_items, (1,), generator=g))],
                    f"e{n}", n, 0, n) for n, u in enumerate([0, 1, 2, 0, 0, 3, 1, 2, 0])]
    out = {}
    for label, block in (("full", 65_536), ("blocked", 7)):
        scorer = Scorer(model, item_ids, "v1", top_k=10, exclude_seen=True,
                        trace_step=trace_step, exact_rank_items=block)
        assert scorer.blocked() == (label == "blocked")
        records, recommendations, _ = scorer.process(events, {})
        ranked = None
        if model.steppable:
            state = scorer.load(["u0"], {"u0": records["u0"]}, {}, BatchStats())
            ranked = scorer.rank_user(records["u0"], state[USER_REPR], 15, True)
        out[label] = (recommendations, ranked)
    for full, blocked in zip(out["full"][0], out["blocked"][0]):
        assert [i["item_id"] for i in full["items"]] == [i["item_id"] for i in blocked["items"]]
        assert torch.allclose(torch.tensor([i["score"] for i in full["items"]]),
                              torch.tensor([i["score"] for i in blocked["items"]]), atol=1e-5)
    if model.steppable:
        (full, how_full), (blocked, how_blocked) = out["full"][1], out["blocked"][1]
        assert how_full == how_blocked == "state" and len(full) == 15
        assert [item for item, _ in full] == [item for item, _ in blocked]
        assert [s for _, s in full] == pytest.approx([s for _, s in blocked], abs=1e-5)
