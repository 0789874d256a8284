"""The approximate item index (model/item_index.py) and the scorer's use of it.

Tests that build an index skip without faiss (`pip install -e '.[ann]'`); those of what
happens without it run either way."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from model.item_index import IndexUnavailable, ItemIndex
from model.ranking import top_k

N_ITEMS = 2_000          # embedding rows; row 0 the pad
N_KNOWN = 1_990          # rows after it are spare, never ranked


def clustered(rows: int, dim: int, seed: int, clusters: int = 12) -> torch.Tensor:
    """Items around a few centres, as trained embeddings are (not uniform noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g) * 2
    return centres[torch.randint(0, clusters, (rows,), generator=g)] \
        + 0.4 * torch.randn(rows, dim, generator=g)


@pytest.mark.parametrize("codes", ["flat", "fp16"])
def test_an_exhaustive_search_is_the_exact_top_k(codes):
    pytest.importorskip("faiss")
    weight = clustered(N_ITEMS, 16, 0)
    users = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    index = ItemIndex.build(weight, N_KNOWN, probe=2, codes=codes)
    exclude = [[], [5, 6, 7], list(range(1, 300)), [], [N_KNOWN - 1], []]
    for ex in (None, exclude):
        scores, items = index.search(users, 10, ex, exhaustive=True)
        want_scores, want_items = top_k(users, weight, 10, N_KNOWN, exclude=ex)
        assert torch.equal(items, want_items)
        assert torch.allclose(scores, want_scores, atol=1e-4)
    assert all(1 <= i < N_KNOWN for i in items.flatten().tolist())


def test_excluded_items_never_come_back_and_each_row_still_gets_k():
    pytest.importorskip("faiss")
    weight = clustered(N_ITEMS, 16, 2)
    users = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    index = ItemIndex.build(weight, N_KNOWN, probe=3)
    _, first = index.search(users, 10)
    exclude = [first[0].tolist(), first[1].tolist()[:3], [], first[3].tolist() * 2]
    scores, items = index.search(users, 10, exclude)
    for row, banned in enumerate(exclude):
        assert not set(items[row].tolist()) & set(banned)
        assert torch.isfinite(scores[row]).all() and len(set(items[row].tolist())) == 10
        assert torch.all(scores[row, :-1] >= scores[row, 1:])
    assert torch.equal(items[2], first[2])


def test_bad_arguments_are_refused():
    pytest.importorskip("faiss")
    weight = clustered(100, 8, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        ItemIndex.build(weight, 100, kind="lsh")
    with pytest.raises(ValueError, match="codes must be one of"):
        ItemIndex.build(weight, 100, codes="pq8")
    with pytest.raises(ValueError, match="n_known 101"):
        ItemIndex.build(weight, 101)
    with pytest.raises(ValueError, match="probe must be at least 1"):
        ItemIndex.build(weight, 100, probe=0)
    with pytest.raises(ValueError, match="exclude has 1 rows, the batch 2"):
        ItemIndex.build(weight, 100).search(torch.randn(2, 8), 5, [[1]])


def scorer_for(model, **kwargs):
    from streams.worker.scoring import Scorer
    item_ids = ["[PAD]"] + [f"item-{i}" for i in range(1, N_KNOWN)]
    return Scorer(model, item_ids, "v1", top_k=10, exclude_seen=True, **kwargs)


def clicks(seed: int = 5):
    from streams.worker.scoring import Event
    g = torch.Generator().manual_seed(seed)
    users = [0, 1, 2, 0, 0, 3, 1, 2, 0, 4]
    return [Event(f"u{u}", f"item-{int(torch.randint(1, N_KNOWN, (1,), generator=g))}",
                  f"e{n}", n, 0, n) for n, u in enumerate(users)]


def small_model(seed: int = 0):
    from model.models import build_model
    torch.manual_seed(seed)
    model = build_model("mlsa4rec-s", N_ITEMS, {"hidden": 16}).eval()
    with torch.no_grad():
        model.item_embedding.weight.copy_(clustered(N_ITEMS, 16, seed))
    return model


def item_lists(recommendations):
    return [[i["item_id"] for i in r["items"]] for r in recommendations]


def test_below_the_threshold_ranking_is_exact_and_as_before():
    model = small_model()
    before = scorer_for(model)                               # the scorer's defaults: exact
    for ann in ("auto", "exact"):
        scorer = scorer_for(model, ann=ann, ann_items=N_KNOWN)      # not above: exact
        assert scorer.ann_index is None
        _, recommendations, _ = scorer.process(clicks(), {})
        _, want, _ = before.process(clicks(), {})
        assert item_lists(recommendations) == item_lists(want)
        assert [[i["score"] for i in r["items"]] for r in recommendations] == \
            [[i["score"] for i in r["items"]] for r in want]


def test_above_the_threshold_the_index_ranks_and_searching_every_list_is_exact():
    pytest.importorskip("faiss")
    model = small_model()
    exact = scorer_for(model)
    indexed = scorer_for(model, ann="faiss", ann_items=1_000, ann_probe=10_000)
    assert indexed.ann_index is not None and indexed.indexed(N_KNOWN)
    _, want, _ = exact.process(clicks(), {})
    records, got, _ = indexed.process(clicks(), {})
    assert item_lists(got) == item_lists(want)
    for event, recommendation in zip(clicks(), got):    # exclude_seen holds
        seen = records[event.user_id].history
        assert event.item_id not in [i["item_id"] for i in recommendation["items"]]
        assert len(recommendation["items"]) == 10 and len(seen) >= 1


def test_a_new_version_gets_a_new_index_of_its_embeddings():
    pytest.importorskip("faiss")
    scorer = scorer_for(small_model(0), ann="faiss", ann_items=1_000, ann_probe=10_000)
    old_index = scorer.ann_index
    newer = small_model(7)                      # other weights, other item embeddings
    scorer.swap(newer, scorer.item_ids, "v2", parent="v1")
    assert scorer.ann_index is not old_index
    users = torch.randn(3, 16, generator=torch.Generator().manual_seed(8))
    _, items = scorer.ann_index.search(users, 10)
    _, want = top_k(users, newer.item_embedding.weight, 10, N_KNOWN)
    assert torch.equal(items, want)
    # A model watcher's prebuilt index goes in as it is.
    prebuilt = scorer.index_for(newer, N_KNOWN)
    scorer.swap(newer, scorer.item_ids, "v3", parent="v2", ann_index=prebuilt)
    assert scorer.ann_index is prebuilt


def test_without_faiss_auto_ranks_exactly_with_a_warning_and_faiss_is_an_error(
        monkeypatch, caplog):
    import streams.worker.scoring as scoring
    monkeypatch.setattr(scoring, "faiss_available", lambda: False)
    monkeypatch.setitem(sys.modules, "faiss", None)          # `import faiss` fails
    model = small_model()
    with pytest.raises(IndexUnavailable, match=r"pip install -e '\.\[ann\]'"):
        scorer_for(model, ann="faiss", ann_items=1_000)
    with pytest.raises(IndexUnavailable, match="needs faiss"):
        ItemIndex.build(model.item_embedding.weight, N_KNOWN)
    with caplog.at_level(logging.WARNING, logger="streams.worker.scoring"):
        scorer = scorer_for(model, ann="auto", ann_items=1_000)
    assert scorer.ann_index is None and not scorer.indexed(N_KNOWN)
    assert "faiss is not installed" in caplog.text and "ranked exactly" in caplog.text
    _, got, _ = scorer.process(clicks(), {})
    _, want, _ = scorer_for(model).process(clicks(), {})
    assert item_lists(got) == item_lists(want)


def test_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match="ann must be one of"):
        scorer_for(small_model(), ann="hnsw")
