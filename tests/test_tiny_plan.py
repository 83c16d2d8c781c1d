"""The main job's plan without running ESPnet: progress lines, duration estimate, reloaded systems."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from espnet_compress.bin.run_tiny import _reloaded
from espnet_compress.pipeline import tiny
from espnet_compress.pipeline.stages import AsrExperiment
from espnet_compress.pipeline.tiny import (
    CONF_DIR,
    DEFAULT_RELOADED,
    DEFAULT_SYSTEMS,
    PlannedStage,
    ReloadedSystem,
    TinyRunConfig,
    TinySystem,
)

BASELINE = CONF_DIR / "train_asr_conformer_tiny.yaml"


def test_every_stage_logs_its_number_and_the_elapsed_time(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    plan = [PlannedStage("made", lambda: True, 90.0), PlannedStage("on_disk", lambda: False, 30.0)]
    with caplog.at_level(logging.INFO, logger=tiny.__name__):
        stages = tiny._run_plan(plan, tmp_path)
    assert [(s.name, s.skipped) for s in stages] == [("made", False), ("on_disk", True)]
    messages = [r.getMessage() for r in caplog.records]
    assert "2 stages, expected at most about 2.0 min for a fresh run" in messages[0]
    assert messages[1].startswith("stage 1/2 made: starting (expected 1.5 min; elapsed 0 s, about 2.0 min left)")
    assert any(m.startswith("stage 2/2 on_disk: starting (expected 30 s;") and m.endswith("about 30 s left)")
               for m in messages)
    assert messages[-1].startswith("all 2 stages finished in")


def test_an_interrupted_job_keeps_the_times_of_the_stages_it_finished(tmp_path: Path) -> None:
    """stages.json is written after every stage; a rerun that skips a stage keeps its first time."""
    import json

    def crash() -> bool:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        tiny._run_plan([PlannedStage("data", lambda: True, 1.0), PlannedStage("train", crash, 1.0)], tmp_path)
    first = {s["name"]: s for s in json.loads((tmp_path / "stages.json").read_text())}
    assert list(first) == ["data"] and not first["data"]["skipped"]
    tiny._run_plan([PlannedStage("data", lambda: False, 1.0), PlannedStage("train", lambda: True, 1.0)], tmp_path)
    again = {s["name"]: s for s in json.loads((tmp_path / "stages.json").read_text())}
    assert again["data"]["seconds"] == first["data"]["seconds"] and not again["data"]["skipped"]
    assert set(again) == {"data", "train"}


def test_training_estimate_follows_the_epochs_actually_asked_for(tmp_path: Path) -> None:
    exp = AsrExperiment(data_dir=tmp_path, train_set="train", valid_set="dev", test_sets=["test"],
                        token_list=tmp_path / "t", stats_dir=tmp_path / "s", exp_dir=tmp_path / "e",
                        train_config=BASELINE, inference_config=CONF_DIR / "decode_asr.yaml",
                        train_args=["--max_epoch", "3"])
    expected = tiny.PROGRAM_START_SECONDS + 3 * 100 * tiny.SECONDS_PER_TRAINED_UTTERANCE
    assert tiny._training_seconds(exp, 100) == pytest.approx(expected)


def test_the_default_main_job_trains_the_baseline_once() -> None:
    assert [s.config.name for s in DEFAULT_SYSTEMS].count(BASELINE.name) == 1
    assert all("elastic" not in s.config.name for s in DEFAULT_SYSTEMS)
    assert DEFAULT_RELOADED == (ReloadedSystem("elastic_conformer", "conformer", "elastic_conformer"),)
    TinyRunConfig(out_dir=Path("unused")).validate()


@pytest.mark.parametrize("reloaded,needle", [
    (ReloadedSystem("e", "nope", "elastic_conformer"), "source 'nope' is not a trained system"),
    (ReloadedSystem("e", "q", "elastic_conformer"), "source 'q' is decoded from its packed export"),
    (ReloadedSystem("b", "b", "elastic_conformer"), "system names must be unique"),
])
def test_bad_reloaded_systems_are_named(reloaded: ReloadedSystem, needle: str) -> None:
    systems = [TinySystem("b", BASELINE), TinySystem("q", BASELINE, "b", packed=True)]
    with pytest.raises(ValueError, match=needle):
        TinyRunConfig(out_dir=Path("unused"), systems=systems, reloaded=[reloaded], baseline="b").validate()


def test_reload_option_syntax() -> None:
    assert _reloaded("el=conformer:elastic_conformer") == ReloadedSystem("el", "conformer", "elastic_conformer")
    for bad in ("el=conformer", "el", "=conformer:elastic_conformer", "el=:elastic_conformer"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=SOURCE:ENCODER"):
            _reloaded(bad)
