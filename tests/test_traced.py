"""The traced step (model/traced.py) gives the eager step's states and scores, at any batch
size and with unknown items; models it cannot trace fall back to eager (None)."""

import pytest
import torch

from model.models import build_model
from model.models.base import OOV
from model.traced import traced_step
from streams.worker.scoring import Scorer
from tests.test_scoring import ITEM_IDS, N_ITEMS, make_events, run_in_batches


@pytest.mark.parametrize("name", ["mlsa4rec-s", "mamba4rec"])
def test_the_traced_step_equals_the_eager_one(name):
    torch.manual_seed(0)
    model = build_model(name, N_ITEMS, {"hidden": 32}).eval()
    step = traced_step(model)
    assert step is not None
    g = torch.Generator().manual_seed(1)
    for batch in (1, 5, 70):
        state = model.init_state(batch)
        for _ in range(4):
            items = torch.randint(1, N_ITEMS, (batch,), generator=g)
            items[0] = OOV                                  # an unknown item in every batch
            eager, repr_ = model.step({k: v.clone() for k, v in state.items()}, items)
            traced, traced_repr, scores = step({k: v.clone() for k, v in state.items()}, items)
            assert torch.allclose(repr_, traced_repr, atol=1e-6)
            for key in eager:
                assert torch.allclose(eager[key], traced[key], atol=1e-6), key
            want = model.scores(repr_)
            assert torch.equal(torch.isinf(want), torch.isinf(scores))
            assert torch.allclose(want[:, 1:], scores[:, 1:], atol=1e-5)
            state = eager
    assert all(p.requires_grad for p in model.parameters())    # left as it was


def test_a_window_model_is_not_traced():
    assert traced_step(build_model("mlsa4rec", N_ITEMS, {"hidden": 32}).eval()) is None


def test_a_scorer_with_the_traced_step_gives_the_same_recommendations():
    torch.manual_seed(0)
    model = build_model("mlsa4rec-s", N_ITEMS, {"hidden": 32, "max_len": 20}).eval()
    events = make_events()
    _, eager = run_in_batches(Scorer(model, ITEM_IDS, "v1"), events, 5)
    traced_scorer = Scorer(model, ITEM_IDS, "v1", trace_step=True)
    assert traced_scorer.traced is not None
    _, traced = run_in_batches(traced_scorer, events, 5)
    for a, b in zip(eager, traced):
        assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
        assert torch.allclose(torch.tensor([i["score"] for i in a["items"]]),
                              torch.tensor([i["score"] for i in b["items"]]), atol=1e-5)
