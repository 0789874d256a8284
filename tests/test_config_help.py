"""Every command's --help says, for each option, what it does, its type and its default (the
comments beside the configuration's fields: model/config.py `field_help`)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import ConfigError, add_arguments, build, field_help
from model.training import TrainConfig
from streams.demo import DemoConfig
from streams.replay.log_replay import ReplayConfig
from streams.shared.config import StreamConfig, TrainerConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = (StreamConfig, TrainerConfig, ReplayConfig, DemoConfig, TrainConfig)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_option_has_a_description(cls):
    described = field_help(cls)
    missing = [f.name for f in dataclasses.fields(cls) if len(described.get(f.name, "")) < 8]
    assert not missing, f"{cls.__name__}: options without a comment to show in --help: {missing}"


def test_help_names_the_type_default_and_environment_variable():
    parser = argparse.ArgumentParser()
    add_arguments(parser, StreamConfig)
    text = " ".join(parser.format_help().split())
    assert ("--batch-max INT A batch goes to the model when the model is free" in text)
    assert "(int, default 256; env MLSA4REC_BATCH_MAX)" in text
    assert "(str, default '127.0.0.1:9092'; env MLSA4REC_BROKER)" in text
    assert "(bool, default false; env MLSA4REC_EXCLUDE_SEEN)" in text


def test_the_cli_prints_it():
    out = subprocess.run([sys.executable, "-m", "cli", "worker", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "default 512; env MLSA4REC_STATE_CACHE_MB" in " ".join(out.split())


def test_a_bad_value_names_the_option(monkeypatch):
    monkeypatch.setenv("MLSA4REC_BATCH_MAX", "lots")
    with pytest.raises(ConfigError, match="MLSA4REC_BATCH_MAX='lots' is not a valid int"):
        build(StreamConfig)
    out = subprocess.run([sys.executable, "-m", "cli", "worker", "--top-k", "ten"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "argument --top-k: invalid int value: 'ten'" in out.stderr
