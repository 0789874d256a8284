"""Online fine-tuning without Kafka: the replay buffer, vocabulary growth, and the trainer's
rounds on synthetic streams (popularity shift, a brand-new item, a bad candidate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.finetune import FineTuneConfig, fine_tune, next_item_metrics
from model.models import build_model
from model.vocab import grow_item_embedding
from streams.shared.config import TrainerConfig
from streams.trainer.replay_buffer import BufferConfig, ReplayBuffer
from streams.worker.scoring import Event, Scorer
from streams.trainer.trainer import OnlineTrainer

N_ITEMS = 61                                   # pad + items 1..60
ITEM_IDS = ["[PAD]"] + [f"i{n}" for n in range(1, N_ITEMS)]
SMALL = {"hidden": 32, "n_mamba_layers": 1, "max_len": 20, "n_interests": 4, "n_heads": 4}


# -- replay buffer ---------------------------------------------------------------------------
def test_buffer_is_bounded_and_holds_out_the_newest_events(tmp_path):
    cfg = BufferConfig(max_seq_len=5, recent_users=3, reservoir_users=4, holdout_events=3)
    buffer = ReplayBuffer(tmp_path / "buf", cfg)
    for n in range(100):
        buffer.add(f"u{n % 10}", f"item{n}")
    assert buffer.sequence("u3") == [f"item{n}" for n in (53, 63, 73, 83, 93)]   # last 5
    assert len(buffer.recent) == 3 and len(buffer.reservoir) == 4
    # The newest 3 events (97, 98, 99) are held out, each after its user's history.
    assert sorted(buffer.holdout_examples(), key=lambda e: e[1]) == [
        ([f"item{n}" for n in (57, 67, 77, 87)], "item97"),
        ([f"item{n}" for n in (58, 68, 78, 88)], "item98"),
        ([f"item{n}" for n in (59, 69, 79, 89)], "item99")]
    assert buffer.training_sequence("u9") == [f"item{n}" for n in (59, 69, 79, 89)]
    assert buffer.training_sequence("u3") == buffer.sequence("u3")
    assert set(buffer.sample_users(50)) <= {f"u{n}" for n in range(10)}
    before = (list(buffer.recent), list(buffer.reservoir), buffer.holdout_examples())
    buffer.close()
    reopened = ReplayBuffer(tmp_path / "buf", cfg)          # a restarted trainer
    assert (list(reopened.recent), list(reopened.reservoir), reopened.holdout_examples()) == before


def test_a_click_read_again_after_a_crash_is_not_added_twice(tmp_path):
    """The trainer adds clicks as it reads them and commits their offsets every few seconds:
    after a crash it reads the uncommitted ones again. The position stored with each user's
    sequence recognises them, across a restart too."""
    buffer = ReplayBuffer(tmp_path / "buf", BufferConfig(max_seq_len=10, holdout_events=1))
    assert buffer.add("u1", "a", ("T", 0, 10)) and buffer.add("u1", "b", ("T", 0, 11))
    assert buffer.add("u2", "x", ("T", 1, 3))
    buffer.db.close()                                       # killed: no flush, no commit
    reopened = ReplayBuffer(tmp_path / "buf", BufferConfig(max_seq_len=10, holdout_events=1))
    assert not reopened.add("u1", "a", ("T", 0, 10))        # read again from offset 10
    assert not reopened.add("u1", "b", ("T", 0, 11))
    assert reopened.add("u1", "c", ("T", 0, 12)) and reopened.add("u2", "y", ("T", 1, 4))
    assert reopened.sequence("u1") == ["a", "b", "c"] and reopened.sequence("u2") == ["x", "y"]
    assert reopened.add("u1", "d")                          # no position: always added
    # The topic deleted and created again (new id): its offsets start over, and count.
    assert reopened.add("u1", "e", ("T2", 0, 0)) and not reopened.add("u1", "e", ("T2", 0, 0))
    assert reopened.sequence("u1") == ["a", "b", "c", "d", "e"]
    # A buffer written before positions were kept stored the bare list; it still reads.
    reopened.db[b"u" + b"old"] = b'["p", "q"]'
    assert reopened.sequence("old") == ["p", "q"] and reopened.add("old", "r", ("T", 2, 0))
    assert reopened.sequence("old") == ["p", "q", "r"]


def test_clicks_read_again_after_a_crash_are_counted_once_in_the_sampling_index(tmp_path):
    """The sampling index is saved at flushes, the sequences at every click. A click between
    the last flush and a crash is in its user's sequence, not in the restored index: read
    again, it goes into the index (not the sequence), so the held-out slice is again the
    newest clicks."""
    cfg = BufferConfig(max_seq_len=10, holdout_events=2)
    buffer = ReplayBuffer(tmp_path / "buf", cfg)
    for offset, item in enumerate("abc"):
        buffer.add("u1", item, ("T", 0, offset))
    buffer.flush()                                  # held out: u1's b and c
    buffer.add("u2", "x", ("T", 0, 3))
    buffer.db.close()                               # killed after x: no flush, no commit
    reopened = ReplayBuffer(tmp_path / "buf", cfg)
    # The restored index still holds out u1's b and c, and x counts as training data.
    assert reopened.training_sequence("u1") == ["a"] and reopened.training_sequence("u2") == ["x"]
    assert not reopened.add("u2", "x", ("T", 0, 3))             # read again: not added twice
    assert reopened.sequence("u2") == ["x"] and reopened.events_seen == 4
    # ... but counted: the newest two clicks (c, x) are the held-out slice again.
    assert reopened.training_sequence("u1") == ["a", "b"] and reopened.training_sequence("u2") == []
    assert not reopened.add("u2", "x", ("T", 0, 3)) and reopened.events_seen == 4   # only once


# -- vocabulary growth -------------------------------------------------------------------------
def test_growing_the_vocabulary_keeps_every_known_score(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlsa4rec-s", 31, SMALL).eval()
    history = torch.tensor([[3, 7, 9]])
    before = model.full_sort_scores(history, torch.tensor([3]))
    assert grow_item_embedding(model, 33, chunk=16)
    assert model.item_embedding.num_embeddings == 48 and model.n_items == 48
    after = model.full_sort_scores(history, torch.tensor([3]))
    assert torch.allclose(after[:, :31], before, atol=1e-6)
    assert not grow_item_embedding(model, 40, chunk=16)                # spare rows suffice
    # A checkpoint of the grown model loads with its spare rows; scoring never names them.
    ids = ["[PAD]"] + [f"i{n}" for n in range(1, 33)]
    save_checkpoint(tmp_path / "grown.pt", model, ids, {}, version="grown")
    loaded, payload = load_checkpoint(tmp_path / "grown.pt")
    assert loaded.item_embedding.num_embeddings == 48
    assert loaded.n_known == 33                       # its items come from its id map
    scorer = Scorer(loaded, payload["item_ids"], "grown", top_k=40)
    _, recs, _ = scorer.process([Event("u", "i3", "e1", 0, 0, 0)], {"u": None})
    # top_k 40 > 32 known items: all 32, never a spare row
    assert sorted(r["item_id"] for r in recs[0]["items"]) == sorted(ids[1:])


def test_spare_rows_stay_out_of_training_and_new_items_start_at_the_known_mean():
    torch.manual_seed(0)
    model = build_model("mlsa4rec-s", 31, SMALL)
    known_mean = model.item_embedding.weight[1:31].mean(dim=0).clone()
    grow_item_embedding(model, 33, chunk=16)                 # 48 rows: 33 known, 15 spare
    assert model.n_known == 33
    spare_before = model.item_embedding.weight[33:].detach().clone()
    # an unknown item is fed as the mean of the known items' rows, spare rows not counted
    oov = model.embed_items(torch.tensor([-1]))[0]
    assert torch.allclose(oov, model.item_embedding.weight[1:33].mean(dim=0))
    sequences = [np.arange(1 + u, 1 + u + 12) % 32 + 1 for u in range(8)]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fine_tune(model, optimizer, sequences, FineTuneConfig(steps=5, batch_size=4, lr=1e-2,
                                                           max_len=8), np.random.default_rng(0))
    # the softmax never saw the spare rows: no gradient, no Adam step
    assert torch.equal(model.item_embedding.weight[33:], spare_before)
    assert not torch.allclose(model.item_embedding.weight[1:31].mean(dim=0), known_mean)
    # two more items take spare rows (no reallocation) and start at today's known mean
    assert not grow_item_embedding(model, 35, chunk=16)
    mean_now = model.item_embedding.weight[1:33].mean(dim=0)
    for row in (33, 34):
        assert torch.allclose(model.item_embedding.weight[row], mean_now)
    assert model.n_known == 35 and torch.equal(model.item_embedding.weight[35:],
                                               spare_before[2:])


# -- synthetic streams -------------------------------------------------------------------------
def chain_sequences(first_item: int, n_users: int, length: int, seed: int) -> list[list[int]]:
    """Users walk items first_item..first_item+29: next = +1 (p 0.8) or +2, wrapping."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        item, seq = int(rng.integers(0, 30)), []
        for _ in range(length):
            seq.append(first_item + item)
            item = (item + (1 if rng.random() < 0.8 else 2)) % 30
        out.append(seq)
    return out


def with_new_item_after_five(sequence: list[int]) -> list[int]:
    """0 marks the new item (it is not in ITEM_IDS)."""
    out = []
    for item in sequence:
        out += [item, 0] if item == 5 else [item]
    return out


def interleave(sequences: list[list[int]]):
    """(user, item index) in a stream order: round-robin over users."""
    for t in range(max(len(s) for s in sequences)):
        for u, seq in enumerate(sequences):
            if t < len(seq):
                yield f"user{u}", seq[t]


def train_offline(model, sequences, steps: int, seed: int = 0):
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    fine_tune(model, optimizer, [np.array(s) for s in sequences],
              FineTuneConfig(steps=steps, batch_size=32, max_len=20), np.random.default_rng(seed))
    return model.eval()


def hr10(model, sequences, n_known=N_ITEMS) -> float:
    """Next-item HR@10 at each user's last item."""
    histories = [np.array(s[:-1]) for s in sequences]
    return next_item_metrics(model, histories, [s[-1] for s in sequences], n_known, 20)["hr@10"]


def make_trainer(model, tmp_path, publish_log, **overrides):
    settings = dict(round_every_events=10 ** 9, steps=60, batch_size=32, lr=3e-3,
                    users_per_round=64, min_holdout=20, holdout_events=40, item_chunk=16,
                    margin=0.02)
    cfg = TrainerConfig(**{**settings, **overrides})

    def publish(model, item_ids, metrics, parent, trained_through):
        publish_log.append({"version": f"v{len(publish_log) + 2}", "parent": parent,
                            "item_ids": list(item_ids), "metrics": metrics})
        return publish_log[-1]

    buffer = ReplayBuffer(tmp_path / "buffer", BufferConfig(200, 200, 200, cfg.holdout_events))
    return OnlineTrainer(model, ITEM_IDS, "v1", buffer, cfg, publish)


@pytest.fixture(scope="module")
def phase_a_model():
    """Trained offline on phase A: items 1-30 only."""
    torch.manual_seed(0)
    return train_offline(build_model("mlsa4rec-s", N_ITEMS, SMALL),
                         chain_sequences(1, 60, 30, seed=1), steps=150)


def test_fine_tuning_recovers_after_a_popularity_shift(phase_a_model, tmp_path):
    stream_b = chain_sequences(31, 60, 30, seed=2)          # phase B: items 31-60 only
    judge_b = chain_sequences(31, 100, 25, seed=3)          # new users of phase B
    torch.manual_seed(0)
    offline_b = train_offline(build_model("mlsa4rec-s", N_ITEMS, SMALL), stream_b, steps=150)

    published = []
    trainer = make_trainer(phase_a_model, tmp_path, published)
    for n, (user, item) in enumerate(interleave(stream_b), 1):
        trainer.add(user, ITEM_IDS[item])
        if n % 450 == 0:                                    # 4 rounds over the phase
            trainer.run_round()
    hr_off, hr_on, hr_offline = hr10(phase_a_model, judge_b), hr10(trainer.serving, judge_b), \
        hr10(offline_b, judge_b)
    print(f"HR@10 on phase B: fine-tuning off {hr_off:.3f}, on {hr_on:.3f}, "
          f"offline on phase B {hr_offline:.3f}")
    assert published, "no round published a version"
    assert hr_offline > 0.8                                 # the phase is learnable
    assert hr_on >= 0.9 * hr_offline                        # recovers to within 10%
    assert hr_off < 0.9 * hr_offline                        # without fine-tuning it does not


def new_item_after_five(trainer, published) -> list[bool]:
    """One round over a stream where a brand-new item always follows item 5; whether it is
    in the published version's top 10 for each of three users whose last item is 5."""
    sequences = chain_sequences(1, 60, 30, seed=4)
    for user, item in interleave([with_new_item_after_five(s) for s in sequences]):
        trainer.add(user, ITEM_IDS[item] if item else "new-item")
    trainer.run_round()
    assert published and "new-item" in published[-1]["item_ids"]
    version = published[-1]
    scorer = Scorer(trainer.serving, version["item_ids"], version["version"])
    histories = [[3, 4, 5], [1, 3, 5], [4, 5]]
    events = [Event(f"probe{n}", ITEM_IDS[item], f"p{n}-{k}", 0, 0, k)
              for n, history in enumerate(histories) for k, item in enumerate(history)]
    _, recs, _ = scorer.process(events, {e.user_id: None for e in events})
    after_five = [[i["item_id"] for i in r["items"]] for r, e in zip(recs, events)
                  if e.item_id == "i5"]
    assert len(after_five) == 3
    return ["new-item" in top for top in after_five]


def test_a_new_item_is_recommended_after_one_round(phase_a_model, tmp_path):
    published = []
    trainer = make_trainer(phase_a_model, tmp_path, published, steps=100)
    assert new_item_after_five(trainer, published) == [True] * 3


@pytest.mark.parametrize("imprint", [True, False], ids=["imprinted", "from-the-mean"])
def test_with_the_default_small_rounds_a_new_item_needs_imprinting(phase_a_model, tmp_path,
                                                                  imprint):
    """The trainer's defaults (20 steps at lr 1e-4) hardly move a row: a new item that starts
    at the known items' mean is nobody's top 10 after a round; imprinted from the contexts
    that led to it, it is the top 10 of the users those contexts describe."""
    published = []
    trainer = make_trainer(phase_a_model, tmp_path, published, steps=TrainerConfig.steps,
                           lr=TrainerConfig.lr, imprint_new_items=imprint)
    assert new_item_after_five(trainer, published) == [imprint] * 3


@pytest.mark.parametrize("lr", [0.3, 50.0], ids=["worse", "diverged"])
def test_a_candidate_worse_than_serving_is_not_published(phase_a_model, tmp_path, lr):
    """A learning rate far too high makes the candidate worse (0.3) or non-finite (50)."""
    published = []
    trainer = make_trainer(phase_a_model, tmp_path, published, lr=lr, steps=30)
    for user, item in interleave(chain_sequences(1, 40, 20, seed=5)):
        trainer.add(user, ITEM_IDS[item])
    result = trainer.run_round()
    assert result.published is None and not published
    assert result.candidate["ndcg@10"] < result.serving["ndcg@10"] * 0.98
    assert trainer.version == "v1" and trainer.serving is phase_a_model


def test_small_losses_do_not_add_up_over_rounds(phase_a_model, tmp_path, monkeypatch):
    """Each round's candidate is a noisy copy of the serving model: within the 10% margin of
    it, but the losses add up. Versions are also judged against the anchor (the version the
    trainer started from), so the served model never falls more than the margin below it."""
    def add_noise(candidate, optimizer, sequences, cfg, rng, device="cpu", first_new=None,
                  first_young=None):
        g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        with torch.no_grad():
            for p in candidate.parameters():
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
        return 1.0
    monkeypatch.setattr("streams.trainer.trainer.fine_tune", add_noise)
    published = []
    trainer = make_trainer(phase_a_model, tmp_path, published, margin=0.1)
    for user, item in interleave(chain_sequences(1, 40, 20, seed=5)):
        trainer.add(user, ITEM_IDS[item])
    results = [trainer.run_round() for _ in range(6)]
    anchor = results[0].anchor["ndcg@10"]
    assert published and all(v["metrics"]["holdout"]["ndcg@10"] >= 0.9 * anchor
                             for v in published)
    # Some candidate was within the margin of the serving version and still refused:
    # without the anchor it would have been published, one more step down.
    assert any(r.published is None and r.candidate["ndcg@10"] >= 0.9 * r.serving["ndcg@10"]
               for r in results)
    assert next_item_metrics(trainer.serving, *holdout_of(trainer), N_ITEMS, 20)["ndcg@10"] \
        >= 0.9 * anchor


def holdout_of(trainer):
    examples = trainer.buffer.holdout_examples()
    return ([np.array([ITEM_IDS.index(i) for i in h]) for h, _ in examples],
            [ITEM_IDS.index(t) for _, t in examples])


def test_once_the_vocabulary_is_full_clicks_on_new_items_are_skipped(phase_a_model, tmp_path):
    trainer = make_trainer(phase_a_model, tmp_path, [], max_items=len(ITEM_IDS))   # + pad
    assert trainer.add("u1", ITEM_IDS[3]) is None
    assert trainer.add("u1", "new-1") is None             # takes the last place
    assert trainer.add("u1", "new-2") == "vocabulary_full"    # skipped, nothing kept
    assert trainer.add("u1", "new-1") is None and trainer.add("u1", ITEM_IDS[4]) is None
    assert trainer.item_ids == list(ITEM_IDS) + ["new-1"]
    assert trainer.buffer.sequence("u1") == ["i3", "new-1", "new-1", "i4"]
    assert trainer.events_since_round == 4


def test_imprinted_rows_take_the_length_asked_and_a_bad_length_is_refused(phase_a_model):
    import copy

    from model.finetune import imprint_new_items, training_batches
    from streams.trainer.trainer import run_trainer

    model = copy.deepcopy(phase_a_model)
    first_new = model.item_embedding.weight.shape[0] - 1          # the last row is "new"
    sequences = [np.array([1, 2, first_new, 3, first_new]), np.array([4, first_new, 5])]
    samples = training_batches(model, sequences, 50)
    mean = model.item_embedding.weight[1:first_new].norm(dim=1).mean()
    with torch.no_grad():
        assert imprint_new_items(model, samples, first_new, norm_scale=0.25) == 1
    got = model.item_embedding.weight[first_new].norm()
    assert torch.isclose(got, 0.25 * mean, rtol=1e-4)
    with pytest.raises(ValueError, match=r"--imprint-norm 0.0: must be > 0"):
        run_trainer(TrainerConfig(broker="127.0.0.1:1", imprint_norm=0.0))


def test_rows_of_titles_newer_than_the_starting_model_take_longer_steps(phase_a_model):
    """With young_item_lr_scale s, a step moves the rows from first_young on s times as far as
    the optimiser would, and every other weight exactly as far; a scale <= 0 is refused."""
    import copy

    from model.finetune import FineTuneConfig, fine_tune
    from streams.trainer.trainer import run_trainer

    first_young = 40                                        # items 40.. are "new titles"
    sequences = [np.array([1, 2, 45, 3, 41]), np.array([4, 45, 5, 42, 43])]
    moved = {}
    for scale in (1.0, 10.0):
        model = copy.deepcopy(phase_a_model)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch.manual_seed(0)                                # the same dropout masks
        fine_tune(model, optimizer, sequences, FineTuneConfig(steps=1, batch_size=8,
                                                              young_item_lr_scale=scale),
                  np.random.default_rng(0), first_young=first_young)
        moved[scale] = {k: v - start[k] for k, v in model.state_dict().items()}
    rows = "item_embedding.weight"
    young_1, young_10 = moved[1.0][rows][first_young:], moved[10.0][rows][first_young:]
    assert young_1.abs().sum() > 0
    assert torch.allclose(young_10, 10 * young_1, atol=1e-6)
    assert torch.equal(moved[10.0][rows][:first_young], moved[1.0][rows][:first_young])
    assert all(torch.equal(moved[10.0][k], moved[1.0][k]) for k in moved[1.0] if k != rows)
    with pytest.raises(ValueError, match=r"--young-item-lr-scale 0.0: must be > 0"):
        run_trainer(TrainerConfig(broker="127.0.0.1:1", young_item_lr_scale=0.0))


def test_a_commit_refused_because_the_group_took_the_partitions_does_not_stop_the_trainer():
    """After a broker restart longer than the session timeout the trainer's commit is refused
    (_ASSIGNMENT_LOST); that must not end it: its clicks come back and are skipped as added.
    Nor must _NO_OFFSET (partitions given out again, nothing consumed from them since): it
    ended the trainer in a CI run; nor _WAIT_COORD (the coordinator not back yet), which ended
    it in `make test`'s broker-restart test. Any other commit error still stops it."""
    from confluent_kafka import KafkaError, KafkaException

    from streams.trainer.trainer import commit

    class Consumer:
        def __init__(self, code):
            self.code, self.calls = code, 0

        def commit(self, asynchronous=True):
            self.calls += 1
            if self.code is not None:
                raise KafkaException(KafkaError(self.code))

    assert commit(Consumer(None)) is True
    assert commit(Consumer(KafkaError._NO_OFFSET)) is True      # nothing consumed since
    for code in (KafkaError._ASSIGNMENT_LOST, KafkaError.REBALANCE_IN_PROGRESS,
                 KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID):
        assert commit(Consumer(code)) is False
    for code in (KafkaError._WAIT_COORD, KafkaError.COORDINATOR_NOT_AVAILABLE,
                 KafkaError.NOT_COORDINATOR, KafkaError._TRANSPORT):
        assert commit(Consumer(code)) is False                 # not now: the next commit
    with pytest.raises(KafkaException):
        commit(Consumer(KafkaError.TOPIC_AUTHORIZATION_FAILED))


def test_an_announcement_the_broker_does_not_confirm_keeps_the_serving_version_and_retries(
        phase_a_model, tmp_path):
    """Right after a broker restart an announcement can go unconfirmed; the trainer must go on
    serving its version and try the round again, not end (it once ended the trainer thread)."""
    from streams.shared.model_updates import AnnouncementError

    published = []
    trainer = make_trainer(phase_a_model, tmp_path, published, steps=2, min_holdout=10 ** 6,
                           round_every_s=0.0)
    confirmed = trainer.publish
    failures = iter([True])

    def publish_once_unconfirmed(*args):
        if next(failures, False):
            raise AnnouncementError("announcement of v2 not confirmed by the broker within 30 s")
        return confirmed(*args)

    trainer.publish = publish_once_unconfirmed
    for user, item in interleave(chain_sequences(1, 20, 10, seed=5)):
        trainer.add(user, ITEM_IDS[item])
    first = trainer.run_round()
    assert next(failures, None) is None, "the first round did not try to announce"
    assert first.published is None and trainer.version == "v1" and not published
    assert trainer.due(), "the clicks of the unconfirmed round must bring another round"
    second = trainer.run_round()
    assert second.published is published[-1] and trainer.version == published[-1]["version"]
    assert published[-1]["parent"] == "v1"
    assert not trainer.due()
