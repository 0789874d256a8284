"""The trainer's default imprint length (RESULTS 11, bench/new_titles.py).

With 15% of ML-100k's titles unknown to the warm start, new rows imprinted at the known rows'
mean length took top-10 places from the known items (-0.026 HR@10 against no imprinting); at
half that length there was no loss. So imprinting, when turned on, uses half the length unless
told otherwise, and a new title is still recommended in the contexts that led to it.
"""

from __future__ import annotations

import torch

from streams.shared.config import TrainerConfig
from test_online import ITEM_IDS, make_trainer, new_item_after_five, phase_a_model  # noqa: F401


def test_imprinting_by_default_gives_a_new_title_half_the_known_rows_length(phase_a_model,
                                                                           tmp_path):
    published = []
    trainer = make_trainer(phase_a_model, tmp_path, published, steps=TrainerConfig.steps,
                           lr=TrainerConfig.lr, imprint_new_items=True,
                           young_item_lr_scale=1.0)     # the imprint alone: no longer steps
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
                           lr=TrainerConfig.lr, imprint_new_items=True, imprint_norm=1.0,
                           young_item_lr_scale=1.0)
    new_item_after_five(trainer, published)
    rows = trainer.serving.item_embedding.weight.detach()
    known_length = rows[1:len(ITEM_IDS)].norm(dim=1).mean()
    assert torch.isclose(rows[trainer.index["new-item"]].norm(), known_length, rtol=0.05)
