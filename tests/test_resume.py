"""Long runs across several sittings: `mlsa4rec train --run-dir DIR [--resume]` (the state
file, the learning curve, refusals) and the paper recipe's batches."""

import argparse
import csv

import numpy as np
import pytest
import torch

import cli
from model import config as typed_config
from model.checkpoint import load_checkpoint
from model.curve import COLUMNS
from model.run_state import state_path
from model.training import RECIPES, TrainConfig, target_batches


class Killed(Exception):
    """Stands for a kill -9 in the middle of an epoch."""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os
    for key in list(os.environ):
        if key.startswith("MLSA4REC_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """30 users walking a ring of 20 items from different starts: learnable in a few epochs."""
    path = tmp_path_factory.mktemp("data") / "log.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for u in range(30):
            for t in range(10 + u % 7):                       # windows of several sizes
                writer.writerow([f"u{u}", f"i{(3 * u + t) % 20}", 1_000_000 + 60 * t + u])
    return path


def train_args(dataset, run_dir, *extra):
    # mamba4rec with its dropout 0.2: the resumed run must also restore the RNG to match
    return ["train", "--dataset", str(dataset), "--model", "mamba4rec", "--run-dir",
            str(run_dir), "--epochs", "5", "--max-len", "8", "--window-stride", "4",
            "--targets-per-batch", "40", "--lr", "0.005", "--progress", "false",
            "--threads", "1", "--device", "cpu", "--set", "hidden=16", "--set", "d_state=4",
            *extra]


def kill_in_epoch(monkeypatch, epoch, after_batches):
    """The run dies after `after_batches` optimiser steps of `epoch`."""
    from model import training
    real_tqdm = training.tqdm

    def batches(iterable, desc="", **kwargs):
        for i, batch in enumerate(real_tqdm(iterable, desc=desc, **kwargs)):
            if desc == f"epoch {epoch}" and i == after_batches:
                raise Killed(f"killed in {desc} after {i} steps")
            yield batch

    monkeypatch.setattr(training, "tqdm", batches)


def curve_rows(run_dir):
    with open(run_dir / "curve.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_timings(rows):
    return [{k: v for k, v in row.items() if k not in ("seconds", "positions_per_s")}
            for row in rows]


def assert_same_final_model(a, b):
    model_a, payload_a = load_checkpoint(a / "model.pt")
    model_b, payload_b = load_checkpoint(b / "model.pt")
    for (name, wa), wb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(wa, wb), name
    for key in ("valid", "test", "best_epoch", "epochs_run"):
        assert payload_a["metrics"][key] == payload_b["metrics"][key], key


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    assert cli.main(train_args(dataset, run_dir)) == 0
    return run_dir


def test_a_run_killed_mid_epoch_and_resumed_ends_as_if_never_stopped(dataset, uninterrupted,
                                                                     tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        kill_in_epoch(patch, epoch=2, after_batches=1)
        with pytest.raises(Killed):
            cli.main(train_args(dataset, run_dir))
    assert [row["epoch"] for row in curve_rows(run_dir)] == ["0", "1"]
    assert not (run_dir / "model.pt").exists()
    with monkeypatch.context() as patch:                  # killed again, in the resumed run
        kill_in_epoch(patch, epoch=3, after_batches=0)
        with pytest.raises(Killed):
            cli.main(train_args(dataset, run_dir, "--resume"))
    assert cli.main(train_args(dataset, run_dir, "--resume")) == 0
    assert_same_final_model(uninterrupted, run_dir)
    rows = curve_rows(run_dir)
    assert [row["epoch"] for row in rows] == ["0", "1", "2", "3", "4"]   # one row an epoch
    assert without_timings(rows) == without_timings(curve_rows(uninterrupted))


def test_a_run_killed_in_its_first_epoch_has_nothing_to_resume(dataset, tmp_path,
                                                              monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        kill_in_epoch(patch, epoch=0, after_batches=1)
        with pytest.raises(Killed):
            cli.main(train_args(dataset, run_dir))
    assert not state_path(run_dir).exists()
    with pytest.raises(SystemExit, match="state.pt does not exist.*without --resume"):
        cli.main(train_args(dataset, run_dir, "--resume"))


def test_a_run_stopped_at_its_epoch_cap_goes_on_with_more_epochs(dataset, uninterrupted,
                                                                 tmp_path):
    run_dir = tmp_path / "run"
    short = train_args(dataset, run_dir)
    short[short.index("--epochs") + 1] = "2"
    assert cli.main(short) == 0
    assert load_checkpoint(run_dir / "model.pt")[1]["metrics"]["epochs_run"] == 2
    assert cli.main(train_args(dataset, run_dir, "--resume")) == 0       # --epochs 5
    assert_same_final_model(uninterrupted, run_dir)


def test_the_curve_has_one_row_an_epoch_and_a_png(uninterrupted):
    rows = curve_rows(uninterrupted)
    assert tuple(rows[0]) == COLUMNS
    assert [int(row["epoch"]) for row in rows] == list(range(5))
    for row in rows:
        assert float(row["train_loss"]) > 0 and 0 <= float(row["valid_ndcg@10"]) <= 1
        assert float(row["lr"]) == 0.005 and float(row["positions_per_s"]) > 0
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (uninterrupted / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_run_resumed_writes_its_checkpoint_again_and_trains_no_more(
        dataset, uninterrupted, tmp_path, capsys):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "model.pt").unlink()                        # killed while writing it, say
    capsys.readouterr()
    assert cli.main(train_args(dataset, run_dir, "--resume")) == 0
    assert "had already finished its 5 epochs" in capsys.readouterr().out
    assert_same_final_model(uninterrupted, run_dir)
    assert len(curve_rows(run_dir)) == 5


@pytest.mark.parametrize("change, named", [
    (["--lr", "0.01"], "lr: 0.005 -> 0.01"),
    (["--set", "hidden=32"], "--set hidden: 16 -> 32"),
    (["--max-len", "6"], "max_len: 8 -> 6"),
])
def test_a_resume_with_other_settings_is_refused_naming_them(dataset, uninterrupted, tmp_path,
                                                             change, named):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    args = train_args(dataset, run_dir, "--resume")
    if change[0] == "--set":
        args[args.index("hidden=16")] = change[1]
    else:
        args[args.index(change[0]) + 1] = change[1]
    with pytest.raises(SystemExit, match="started with other settings") as err:
        cli.main(args)
    assert named in str(err.value)


def test_a_run_dir_in_use_is_not_overwritten_without_resume(dataset, uninterrupted):
    with pytest.raises(SystemExit, match="already holds a run.*--resume"):
        cli.main(train_args(dataset, uninterrupted))


def test_a_missing_or_corrupt_state_is_a_clear_error(dataset, uninterrupted, tmp_path):
    with pytest.raises(SystemExit, match="state.pt does not exist"):
        cli.main(train_args(dataset, tmp_path / "empty", "--resume"))
    (tmp_path / "junk").mkdir()
    state_path(tmp_path / "junk").write_bytes(b"not a torch file")
    with pytest.raises(SystemExit, match="state.pt is not a readable training state"):
        cli.main(train_args(dataset, tmp_path / "junk", "--resume"))
    whole = state_path(uninterrupted).read_bytes()
    (tmp_path / "cut").mkdir()
    state_path(tmp_path / "cut").write_bytes(whole[:len(whole) // 2])   # a torn copy
    with pytest.raises(SystemExit, match="state.pt is not a readable training state"):
        cli.main(train_args(dataset, tmp_path / "cut", "--resume"))
    with pytest.raises(SystemExit, match="--resume needs --run-dir"):
        cli.main(["train", "--dataset", str(dataset), "--resume"])


# ------------------------------------------------------------------------ the paper recipe

def test_target_batches_hold_each_window_once_and_at_most_the_limit():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 200, size=500)
    order = rng.permutation(500)
    batches = target_batches(order, counts, 2048)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    assert np.array_equal(np.concatenate(batches), order)       # the shuffled order, kept
    sizes = [int(counts[b].sum()) for b in batches]
    assert max(sizes) <= 2048
    assert np.mean(sizes[:-1]) > 2048 - 200                     # full but for one window
    assert target_batches(np.array([0, 1]), np.array([5000, 3]), 2048)[0].tolist() == [0]


def test_the_paper_recipe_sets_what_the_command_line_does_not(monkeypatch):
    parser = argparse.ArgumentParser()
    typed_config.add_arguments(parser, TrainConfig)
    parser.add_argument("--recipe")
    args = parser.parse_args(["--recipe", "paper", "--lr", "0.002"])
    monkeypatch.setenv("MLSA4REC_PATIENCE", "3")
    cli._apply_recipe(args)
    cfg = typed_config.build(TrainConfig, args)
    assert (cfg.max_len, cfg.targets_per_batch, cfg.epochs) == (200, 2048, 300)
    assert cfg.lr == 0.002 and cfg.patience == 3              # command line, environment win
    assert set(RECIPES["paper"]) <= {f.name for f in TrainConfig.__dataclass_fields__.values()}
