"""The accuracy targets of docs/RESULTS.md, on the real ML-1M: hours on CPU, so `slow`."""

import pytest

from model.data.protocol import load_interactions, prepare
from model.models import build_model
from model.training import TrainConfig, train


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlsa4rec-s", "mlsa4rec"])
def test_mlsa4rec_reaches_paper_level_accuracy_on_ml1m(name):
    data = prepare(load_interactions("ml-1m"))
    model = build_model(name, data.n_items)
    result = train(model, data, TrainConfig(dataset="ml-1m", model=name, progress=False))
    assert result.test["hr@10"] >= 0.30
    assert result.test["ndcg@10"] >= 0.17
