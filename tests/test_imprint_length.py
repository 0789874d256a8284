"""The trainer's default imprint length (RESULTS 11, bench/new_titles.py).

With 15% of ML-100k's titles unknown to the warm start, new rows imprinted at the known rows'
mean length took top-10 places from the known items (-0.026 HR@10 against no imprinting); at
half that length there was no loss. So imprinting, when turned on, uses half the length unless
told otherwise, and a new title is still recommended in the contexts that led to it.

One length for every new row cannot be right (a title clicked by many should score like a
popular one), so `imprint_length="clicks"` takes each new row's length from its evidence: the
median length of the known rows clicked about as often in the round's samples (RESULTS 11c).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model.finetune as finetune
from model.config import ConfigError, build
from model.finetune import (IMPRINT_NEIGHBOURS, FineTuneConfig, imprint_new_items,
                            popularity_matched, training_batches)
from model.models import build_model
from streams.shared.config import TrainerConfig
from test_online import (ITEM_IDS, SMALL, make_trainer, new_item_after_five,  # noqa: F401
                         phase_a_model)


def test_imprinting_by_default_gives_a_new_title_half_the_known_rows_length(phase_a_model,
                                                                           tmp_path):
    published = []
    trainer = make_trainer(phase_a_model, tmp_path, published, steps=TrainerConfig.steps,
                           lr=TrainerConfig.lr, imprint_new_items=True)
    # Still in the top 10 of the users whose last item is the one it always follows.
    assert new_item_after_five(trainer, published) == [True] * 3
    rows = trainer.serving.item_embedding.weight.detach()
    known_length = rows[1:len(ITEM_IDS)].norm(dim=1).mean()
    new_length = rows[trainer.index["new-item"]].norm()
    # The round's few small steps after the imprint hardly change it.
    assert torch.isclose(new_length, 0.5 * known_length, rtol=0.05), \
        f"new row {new_length:.3f}, known rows' mean {known_length:.3f}"


def test_a_longer_imprint_is_still_asked_for_explicitly(phase_a_model, tmp_path):
    published = []
    trainer = make_trainer(phase_a_model, tmp_path, published, steps=TrainerConfig.steps,
                           lr=TrainerConfig.lr, imprint_new_items=True, imprint_norm=1.0)
    new_item_after_five(trainer, published)
    rows = trainer.serving.item_embedding.weight.detach()
    known_length = rows[1:len(ITEM_IDS)].norm(dim=1).mean()
    assert torch.isclose(rows[trainer.index["new-item"]].norm(), known_length, rtol=0.05)


N_KNOWN = 61                      # pad + known items 1..60; the new titles are 61 and 62
RARE, POPULAR = 61, 62


def clicks_stream():
    """Sequences where known item i is a target about i times (so the known items' click
    counts run from rare to popular), the new title RARE once and POPULAR 50 times."""
    rng = np.random.default_rng(0)
    targets = [i for i in range(1, N_KNOWN) for _ in range(i)] + [RARE] + [POPULAR] * 50
    rng.shuffle(targets)
    return [np.array([int(rng.integers(1, N_KNOWN)), t], dtype=np.int64) for t in targets]


def model_with_lengths_following_clicks(samples):
    """An untrained model whose known rows are as long as 0.1 x their click count in the
    samples (in a trained model popular items' rows tend to be longer)."""
    torch.manual_seed(0)
    model = build_model("mlsa4rec-s", N_KNOWN + 2, SMALL)
    clicks = torch.bincount(samples[2].flatten(), minlength=N_KNOWN + 2).float()
    with torch.no_grad():
        rows = model.item_embedding.weight
        rows[1:N_KNOWN] = torch.nn.functional.normalize(rows[1:N_KNOWN], dim=1) \
            * 0.1 * clicks[1:N_KNOWN, None]
    return model, clicks


def test_a_title_clicked_often_gets_a_longer_row_than_one_clicked_once():
    torch.manual_seed(0)
    probe = build_model("mlsa4rec-s", N_KNOWN + 2, SMALL)
    samples = training_batches(probe, clicks_stream(), SMALL["max_len"])
    model, clicks = model_with_lengths_following_clicks(samples)
    rows = model.item_embedding.weight
    known = rows[1:N_KNOWN].detach().norm(dim=1)

    assert imprint_new_items(model, samples, N_KNOWN, 1.0, length="clicks") == 2
    rare, popular = rows[RARE].detach().norm(), rows[POPULAR].detach().norm()
    # Each tracks the known rows with the closest click counts: the 25 nearest to 1 click
    # are items 1-25 (median item 13: 1.3); the 25 nearest to 50 clicks are items 36-60
    # (median item 48: 4.8). The known rows' mean length is 3.05.
    assert clicks[RARE] == 1 and clicks[POPULAR] == 50
    expected = popularity_matched(known, clicks[1:N_KNOWN], clicks[[RARE, POPULAR]])
    assert torch.allclose(torch.stack([rare, popular]), expected, rtol=1e-4)
    assert torch.allclose(torch.stack([rare, popular]), torch.tensor([1.3, 4.8]), rtol=1e-4)
    assert rare < 0.5 * known.mean() < known.mean() < popular, (rare, known.mean(), popular)

    # "mean" (before this option, the only length) gives both the same length.
    model, _ = model_with_lengths_following_clicks(samples)
    imprint_new_items(model, samples, N_KNOWN, 1.0, length="mean")
    rows = model.item_embedding.weight.detach()
    assert torch.isclose(rows[RARE].norm(), rows[POPULAR].norm(), rtol=1e-4)
    assert torch.isclose(rows[RARE].norm(), known.mean(), rtol=1e-4)


@torch.no_grad()
def mean_scores_on_own_contexts(model, samples):
    """Each item's mean score (dot product) over the contexts that led to it in samples."""
    inputs, _, targets = samples
    model.eval()
    out = model.sequence_output(inputs)
    mask = targets > 0
    rows = model.item_embedding.weight
    y = targets[mask]
    scores = (out[mask] * rows[y]).sum(1)
    n = len(rows)
    return (torch.zeros(n).index_add_(0, y, scores)
            / torch.bincount(y, minlength=n).clamp_min(1)), torch.bincount(y, minlength=n)


def model_scoring_by_clicks(samples):
    """An untrained model whose known rows point along the mean of their contexts (half-way:
    a known row does not fit them exactly) and are as long as 0.1 x their clicks."""
    model, clicks = model_with_lengths_following_clicks(samples)
    inputs, _, targets = samples
    with torch.no_grad():
        model.eval()
        out = model.sequence_output(inputs)
        mask = targets > 0
        sums = torch.zeros_like(model.item_embedding.weight).index_add_(0, targets[mask],
                                                                         out[mask])
        rows = model.item_embedding.weight
        towards = torch.nn.functional.normalize(sums[1:N_KNOWN], dim=1) \
            + torch.nn.functional.normalize(rows[1:N_KNOWN], dim=1)
        rows[1:N_KNOWN] = torch.nn.functional.normalize(towards, dim=1) \
            * 0.1 * clicks[1:N_KNOWN, None]
    return model


def test_a_score_matched_row_scores_on_its_contexts_what_matched_known_rows_score():
    torch.manual_seed(0)
    probe = build_model("mlsa4rec-s", N_KNOWN + 2, SMALL)
    samples = training_batches(probe, clicks_stream(), SMALL["max_len"])
    model = model_scoring_by_clicks(samples)
    before, clicks = mean_scores_on_own_contexts(model, samples)
    # The more clicks a known row has, the more it scores on its contexts.
    assert before[50] > before[10] > 0
    assert imprint_new_items(model, samples, N_KNOWN, 1.0, length="score") == 2
    after, _ = mean_scores_on_own_contexts(model, samples)
    assert torch.equal(after[1:N_KNOWN], before[1:N_KNOWN])     # known rows untouched
    expected = popularity_matched(before[1:N_KNOWN], clicks[1:N_KNOWN],
                                  clicks[[RARE, POPULAR]])
    assert torch.allclose(after[[RARE, POPULAR]], expected, rtol=1e-3, atol=1e-5)
    assert after[POPULAR] > after[RARE] > 0
    # imprint_norm scales the length, so the score, too.
    model = model_scoring_by_clicks(samples)
    imprint_new_items(model, samples, N_KNOWN, 0.5, length="score")
    half, _ = mean_scores_on_own_contexts(model, samples)
    assert torch.allclose(half[[RARE, POPULAR]], 0.5 * expected, rtol=1e-3, atol=1e-5)


def test_popularity_matched_values_are_the_median_of_the_nearest_known_counts():
    lengths = torch.arange(1.0, 101.0)                  # known item k: length k, k clicks
    counts = torch.arange(1, 101)
    got = popularity_matched(lengths, counts, torch.tensor([1, 50, 500]))
    # 1 click: items 1-25; 50: items 38-62; 500: the 25 most clicked, 76-100 (medians as
    # torch takes them: the lower of the two middle values for an even count; 25 is odd).
    assert got.tolist() == [13.0, 50.0, 88.0]
    assert IMPRINT_NEIGHBOURS == 25
    # Fewer known items than neighbours: the median of all of them.
    assert popularity_matched(lengths[:3], counts[:3], torch.tensor([7])).item() == 2.0


def test_the_trainer_passes_its_imprint_length_to_the_imprint(phase_a_model, tmp_path,
                                                             monkeypatch):
    seen = []
    real = finetune.imprint_new_items

    def recording(*args, **kwargs):
        seen.append((args[3], kwargs.get("length")))
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "imprint_new_items", recording)
    published = []
    trainer = make_trainer(phase_a_model, tmp_path, published, steps=TrainerConfig.steps,
                           lr=TrainerConfig.lr, imprint_new_items=True,
                           imprint_length="clicks", imprint_norm=0.8)
    # The new title always follows item 5, so it is as popular as item 5: its popularity-
    # matched row still puts it in the top 10 after item 5.
    assert new_item_after_five(trainer, published) == [True] * 3
    assert seen == [(0.8, "clicks")]


def test_the_default_length_is_the_mean_and_a_bad_one_names_the_option(monkeypatch):
    assert TrainerConfig().imprint_length == "mean" == FineTuneConfig().imprint_length
    with pytest.raises(ConfigError,
                       match=r"imprint_length .*'popular': must be mean, clicks or score"):
        TrainerConfig(imprint_length="popular")
    monkeypatch.setenv("MLSA4REC_IMPRINT_LENGTH", "median")
    with pytest.raises(ConfigError, match="MLSA4REC_IMPRINT_LENGTH"):
        build(TrainerConfig)
    with pytest.raises(ValueError, match="imprint_length 'median'"):
        imprint_new_items(None, None, 1, length="median")
