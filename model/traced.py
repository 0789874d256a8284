"""A steppable model's step + full scores as one traced graph (torch.jit.trace).

Why: a step of MLSA4Rec-S is ~150 small tensor ops, and eager PyTorch takes the GIL back
between any two of them. In a process whose other thread runs Python (the streaming worker's
event loop), each of those hand-overs can wait for that thread's switch interval: with one busy
Python thread beside it, a batch-256 step + scores took 10x longer eager than traced
(`bench/worker_parts.py`, docs/RESULTS.md section 4c). A traced graph runs in C++ and holds the
GIL only to enter and leave.

The item lookup is rewritten without `model.embed_items`' branch on the data (which a trace
would freeze): unknown items take the known items' mean through a `where`, then
`model.step_vectors` and `model.scores`. Traced graphs generalise over the batch size here because the step
has no shape-dependent Python; `traced_step` checks that against the eager step on two other
batch sizes and returns None (use eager) if they differ or tracing fails.
"""

from __future__ import annotations

import logging

import torch

from model.models.base import OOV

log = logging.getLogger(__name__)


def traced_step(model, device="cpu", example_batch: int = 8, tolerance: float = 1e-5,
                scores: bool = True):
    """fn(state, item_ids) -> (state, user_repr (batch, hidden), scores (batch, n_items)),
    equal to `model.step` + `model.scores`, advancing `state` in place like `model.step`; or
    None. scores=False: (state, user_repr) only (a catalogue ranked block by block)."""
    if not getattr(model, "steppable", False) or not hasattr(model, "step_vectors"):
        return None
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:                     # a trace keeps parameters as constants
        p.requires_grad_(False)

    try:
        with torch.no_grad():
            # The version's weights do not change while it serves: the vector of an unknown
            # item (the known items' mean) is a constant of its graph.
            unknown_vector = model.known_item_mean().detach().clone()

            def step(state, item_ids):
                vectors = model.item_embedding(item_ids.clamp(min=0))
                vectors = torch.where((item_ids == OOV).unsqueeze(-1), unknown_vector, vectors)
                state, user_repr = model.step_vectors(state, vectors)
                if not scores:
                    return state, user_repr
                return state, user_repr, model.scores(user_repr)

            state, items = _example(model, example_batch, device)
            step = torch.jit.trace(step, (state, items), strict=False, check_trace=False)

            for batch in (1, example_batch * 4 + 3):
                if not _agrees(model, step, batch, device, tolerance):
                    log.warning("traced step differs from the eager one at batch %d: eager",
                                batch)
                    return None
        return step
    except Exception as exc:             # noqa: BLE001 - eager works for every model
        log.warning("cannot trace %s's step (%r): eager", type(model).__name__, exc)
        return None
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _example(model, batch: int, device):
    """A state a few steps in (not the initial one, whose zeros could hide differences)."""
    g = torch.Generator().manual_seed(batch)
    n_items = model.item_embedding.num_embeddings
    state = model.init_state(batch, device=device)
    for _ in range(3):
        state, _ = model.step(state, torch.randint(1, n_items, (batch,), generator=g).to(device))
    items = torch.randint(1, n_items, (batch,), generator=g)
    items[0] = OOV                                      # an unknown item in every check
    return state, items.to(device)


def _agrees(model, step, batch: int, device, tolerance: float) -> bool:
    state, items = _example(model, batch, device)
    eager_state, user_repr = model.step({k: v.clone() for k, v in state.items()}, items)
    eager_scores = model.scores(user_repr)
    traced_state, traced_repr, *traced_scores = step({k: v.clone() for k, v in state.items()},
                                                     items)
    traced_scores = traced_scores[0] if traced_scores else eager_scores
    finite = torch.isfinite(eager_scores)
    return (torch.allclose(user_repr, traced_repr, atol=tolerance)
            and torch.equal(finite, torch.isfinite(traced_scores))
            and torch.allclose(eager_scores[finite], traced_scores[finite], atol=tolerance)
            and all(torch.allclose(eager_state[k], traced_state[k], atol=tolerance)
                    for k in eager_state))
