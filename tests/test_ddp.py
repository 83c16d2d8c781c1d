"""Real distributed training: the stock ``asr_train`` in two CPU processes (gloo) on the nested model.

ESPnet's ``--multiprocessing_distributed`` spawns one process per GPU, so with ``--ngpu 0`` it falls
back to one process; CPU DDP therefore takes an external launcher, exactly like a multi-node GPU
job: ``python -m torch.distributed.run --nproc_per_node 2 -m espnet2.bin.asr_train
--multiprocessing_distributed false --ngpu 0 --dist_backend gloo ...`` (ranks from ``RANK`` /
``WORLD_SIZE`` / ``MASTER_*``, which the launcher sets). Each rank is observed from inside by
``tests/ddp_instrument/sitecustomize.py`` (drawn systems per step, final weights per rank).

The model is the all-in-one supernet with ``sampling: random`` (the largest system plus one drawn
system per step): the draw must be the same on both ranks every step, or the ranks would train
different sub-networks on one all-reduced gradient. Resuming from the epoch-1 checkpoint must
continue the draws where the uninterrupted run is, not restart them (the model's step counter is
a persistent buffer stored in ``checkpoint.pth``).

Three two-rank launches take about 2.5 minutes on 2 cores (mostly interpreter and ESPnet start-up),
so the ``ddp`` marker keeps this out of the default run: ``pytest -q -m ddp tests/test_ddp.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import soundfile
import torch
import yaml

from espnet_compress.corpus.kaldi_dir import write_kaldi_dir
from espnet_compress.pipeline.tiny import CONF_DIR
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

INSTRUMENT = REPO / "tests" / "ddp_instrument"
WORDS = ("go", "stop", "left", "right", "up", "down")
FS = 16000
NUM_TRAIN, NUM_DEV = 16, 4
#: per step each of the 2 ranks gets half of a 4-utterance batch: 4 steps per epoch
BATCH_SIZE = 4
EPOCHS = 2
SYSTEMS = {"full": {}, "depth3": {"blocks": [0, 1, 3]}, "ffn16": {"ffn_units": 16},
           "int4": {"bits": 4, "decoder_bits": 4}}


def _corpus(root: Path) -> Path:
    """Noise 'recordings' with word transcripts: enough for training steps, nothing to learn."""
    rng = np.random.default_rng(0)
    data = root / "data"
    for split, count in (("train", NUM_TRAIN), ("dev", NUM_DEV)):
        entries = []
        for i in range(count):
            utt = f"spk{i % 2}-{split}{i:03d}"
            wav = root / "wav" / f"{utt}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(wav, (0.1 * rng.standard_normal(int(FS * rng.uniform(0.4, 0.8)))).astype(np.float32), FS)
            entries.append((utt, f"spk{i % 2}", str(wav), " ".join(rng.choice(WORDS, size=rng.integers(1, 4)))))
        write_kaldi_dir(data / split, entries)
    tokens = ["<blank>", "<unk>", *sorted(WORDS), "<sos/eos>"]
    (root / "tokens.txt").write_text("".join(f"{t}\n" for t in tokens))
    for split in ("train", "dev"):
        speech, text = [], []
        for wav_line, text_line in zip((data / split / "wav.scp").read_text().splitlines(),
                                       (data / split / "text").read_text().splitlines()):
            utt, wav = wav_line.split(maxsplit=1)
            speech.append(f"{utt} {soundfile.info(wav).frames}\n")
            text.append(f"{utt} {len(text_line.split()) - 1},{len(tokens)}\n")
        (data / split / "speech_shape").write_text("".join(speech))
        (data / split / "text_shape").write_text("".join(text))
    return data


def _config(root: Path) -> Path:
    """The sampled nested tiny config (``sampling: random``), shrunk to a few-second model."""
    conf = yaml.safe_load((CONF_DIR / "train_asr_nested_conformer_tiny_random1.yaml").read_text())
    conf["encoder_conf"].update(output_size=32, attention_heads=2, linear_units=32, cnn_module_kernel=5)
    conf["decoder_conf"].update(attention_heads=2, linear_units=32)
    conf["model_conf"].update(systems=SYSTEMS, sampling="random", num_random_systems=1)
    conf.update(batch_type="unsorted", batch_size=BATCH_SIZE, num_workers=0, use_tensorboard=False,
                use_matplotlib=False, max_epoch=EPOCHS)
    conf.pop("batch_bins", None)
    path = root / "train_nested_ddp.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))  # the first system is the largest
    return path


def _train(root: Path, data: Path, config: Path, exp: Path, record: Path, max_epoch: int) -> None:
    """Two ranks of the stock asr_train (resuming whatever checkpoint ``exp`` holds)."""
    record.mkdir(parents=True, exist_ok=True)
    args = ["--multiprocessing_distributed", "false", "--ngpu", "0", "--dist_backend", "gloo",
            "--config", str(config), "--output_dir", str(exp), "--resume", "true", "--max_epoch", str(max_epoch),
            "--token_type", "word", "--token_list", str(root / "tokens.txt"), "--log_interval", "1"]
    for prefix, split in (("train", "train"), ("valid", "dev")):
        args += [f"--{prefix}_data_path_and_name_and_type", f"{data / split / 'wav.scp'},speech,sound",
                 f"--{prefix}_data_path_and_name_and_type", f"{data / split / 'text'},text,text",
                 f"--{prefix}_shape_file", str(data / split / "speech_shape"),
                 f"--{prefix}_shape_file", str(data / split / "text_shape")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ESPNET_COMPRESS_DDP_RECORD=str(record),
               PYTHONPATH=os.pathsep.join(filter(None, [str(INSTRUMENT), os.environ.get("PYTHONPATH")])))
    for var in ("ESPNET_COMPRESS_SYSTEM", "ESPNET_COMPRESS_PLAN", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "espnet2.bin.asr_train", *args]
    log_file = record / "launch.log"
    with open(log_file, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, log_file.read_text()[-4000:]


def _draws(record: Path, rank: int) -> List[Dict]:
    return [json.loads(line) for line in (record / f"draws.rank{rank}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Dict[str, Path]:
    """An uninterrupted 2-epoch run, and a run stopped after epoch 1 then resumed to epoch 2."""
    root = tmp_path_factory.mktemp("ddp")
    data = _corpus(root)
    config = _config(root)
    _train(root, data, config, root / "exp_full", root / "rec_full", EPOCHS)
    _train(root, data, config, root / "exp_resumed", root / "rec_first", 1)
    shutil.copy(root / "exp_resumed" / "checkpoint.pth", root / "checkpoint_epoch1.pth")
    _train(root, data, config, root / "exp_resumed", root / "rec_resumed", EPOCHS)
    return {"full": root / "rec_full", "first": root / "rec_first", "resumed": root / "rec_resumed",
            "exp_full": root / "exp_full", "exp_resumed": root / "exp_resumed",
            "checkpoint_epoch1": root / "checkpoint_epoch1.pth"}


def _checkpoint_model(path: Path) -> Dict[str, torch.Tensor]:
    """The model state in ESPnet's ``checkpoint.pth`` (it also pickles reporter objects)."""
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _assert_same_weights(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_both_ranks_draw_the_same_systems_every_step(runs):
    rank0, rank1 = _draws(runs["full"], 0), _draws(runs["full"], 1)
    assert len(rank0) == EPOCHS * NUM_TRAIN // BATCH_SIZE
    assert rank0 == rank1
    assert [d["step"] for d in rank0] == list(range(len(rank0)))
    assert all(d["systems"][0] == "full" and len(d["systems"]) == 2 for d in rank0)
    assert len({d["systems"][1] for d in rank0}) > 1, "random sampling drew one system every step"


def test_final_weights_are_identical_on_both_ranks(runs):
    rank0 = torch.load(runs["full"] / "final.rank0.pth", map_location="cpu")
    _assert_same_weights(torch.load(runs["full"] / "final.rank1.pth", map_location="cpu"), rank0)
    # what ESPnet wrote (on rank 0 only) is what both ranks hold
    _assert_same_weights(_checkpoint_model(runs["exp_full"] / "checkpoint.pth"), rank0)


def test_resume_from_a_mid_run_checkpoint_continues_the_draws(runs):
    full = _draws(runs["full"], 0)
    first = _draws(runs["first"], 0)
    assert first == full[: len(first)]
    # Needs the step counter in checkpoint.pth (a persistent buffer of the model): a counter that
    # restarts at 0 on resume replays epoch 1's draws instead of epoch 2's.
    assert int(_checkpoint_model(runs["checkpoint_epoch1"])["num_steps"]) == len(first)
    for rank in (0, 1):
        assert _draws(runs["resumed"], rank) == full[len(first):]
    # ESPnet reseeds every epoch and restores optimizer and scheduler: the resumed training ends
    # bit-identical to the uninterrupted one
    _assert_same_weights(_checkpoint_model(runs["exp_resumed"] / "checkpoint.pth"),
                         _checkpoint_model(runs["exp_full"] / "checkpoint.pth"))
