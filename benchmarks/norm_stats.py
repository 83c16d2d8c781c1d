"""What per-system batch-norm statistics change: WER of every system with its own statistics vs
one set of statistics shared by all systems (what the code kept before they were per system).

The Conformer's convolution module normalises with running statistics at decode time. A
multi-system model used to keep one set for all its systems, updated by every system in every
step; now each (system, use of a block) keeps its own (``espnet_compress.core.norm_stats``).
Training itself is unaffected (training forwards normalise with batch statistics), so one trained
model shows the effect: each system is decoded (stock ``asr_inference``) from

* the checkpoint as trained (its own statistics), and
* the same checkpoint with every norm's statistics replaced by their mean over all slots of that
  norm (the systems' statistics averaged: what one shared buffer updated by every system in turn
  converges to, up to the weighting of its exponential average).

Models: the nested benchmark's all-in-one model, its half-system variant (``--tag half``) and the
foldable benchmark's joint + KL seed (the same training dirs, so those benchmarks reuse the
trainings). MAPSSWE compares the two decodes of
each system (own statistics as the baseline).

Usage::

    nice -n 19 .venv/bin/python benchmarks/norm_stats.py --exp_dir exp/tiny

Outputs ``<exp_dir>/benchmarks/norm_stats_<models>.{md,json}`` (one pair per set of ``--models``, so
models trained for different epochs are run one at a time).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from nested_supernet import (  # noqa: E402
    NESTED_CONFIG,
    add_common_args,
    begin,
    prepare_corpus,
    save_report,
    tagged,
    timed_train,
)

from espnet_compress.core.norm_stats import SLOT_CONTAINER  # noqa: E402
from espnet_compress.scoring.compare import SystemSpec, compare, verdict_text  # noqa: E402

log = logging.getLogger("norm_stats")
FOLDABLE_CONFIG = REPO / "conf" / "spoken_commands" / "train_asr_foldable_conformer_tiny.yaml"
#: the half-system supernet that ``nested_supernet.py --config <this> --tag half`` trains under the
#: baseline's stopping rule (the trained point at which these statistics matter)
NESTED_HALF_CONFIG = REPO / "conf" / "spoken_commands" / "train_asr_nested_conformer_tiny_half.yaml"
SHARED_SUFFIX = ".sharedbn"
MODELS = ("nested", "nested_half", "foldable_joint_kl")
#: measured when ``--models`` is not given (``nested_half`` trains under the stopping rule, up to 80 epochs: on request)
DEFAULT_MODELS = ("nested", "foldable_joint_kl")


def shared_statistics(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with every norm's running mean/variance (own buffers and every slot) replaced by
    their mean over the norm's slots."""
    out = dict(state)
    owners = {k[: -len(".running_mean")] for k in state if k.endswith(".running_mean") and SLOT_CONTAINER not in k}
    for norm in owners:
        for buf in ("running_mean", "running_var"):
            keys = [f"{norm}.{buf}"] + [k for k in state if k.startswith(f"{norm}.{SLOT_CONTAINER}.")
                                        and k.endswith(f".{buf}")]
            mean = torch.stack([state[k].float() for k in keys]).mean(0)
            for k in keys:
                out[k] = mean.to(state[k].dtype)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS),
                   help="which trained models to measure (run one process per model to train them in parallel)")
    args = p.parse_args(argv)
    train_args = begin(args)
    exp_dir = args.exp_dir.resolve()
    template = prepare_corpus(args)
    models = {
        "nested": (dataclasses.replace(template, exp_dir=exp_dir / "benchmarks" / "nested_supernet" / "asr_nested",
                                       train_config=NESTED_CONFIG, train_args=train_args), NESTED_CONFIG),
        "nested_half": (dataclasses.replace(template, exp_dir=exp_dir / "benchmarks" / "nested_supernet" / "asr_nested_half",
                                            train_config=NESTED_HALF_CONFIG, train_args=train_args), NESTED_HALF_CONFIG),
        "foldable_joint_kl": (dataclasses.replace(template, exp_dir=exp_dir / "benchmarks" / "foldable" / "asr_joint_kl",
                                                  train_config=FOLDABLE_CONFIG, train_args=train_args), FOLDABLE_CONFIG),
    }
    rows = []
    for model_name, (exp, config) in ((m, models[m]) for m in args.models):
        record = timed_train(model_name, exp, args.max_epoch)
        own_file = exp.exp_dir / exp.inference_model
        shared_name = Path(exp.inference_model).stem + SHARED_SUFFIX + ".pth"
        shared_file = exp.exp_dir / shared_name
        if not shared_file.exists():
            state = torch.load(own_file, map_location="cpu", weights_only=True)
            tmp = shared_file.with_suffix(".tmp")
            torch.save(shared_statistics(state), tmp)
            tmp.rename(shared_file)
        systems = list(yaml.safe_load(config.read_text())["model_conf"]["systems"])
        for system in tqdm(systems, desc=f"decode {model_name}", unit="system"):
            env = {"ESPNET_COMPRESS_SYSTEM": system}
            own = tagged(exp, f"sys_{system}", env)
            shared = tagged(dataclasses.replace(exp, inference_model=shared_name), f"sys_{system}", env)
            own.decode()
            shared.decode()
            table = compare([SystemSpec("own", own.decode_dir(), own_file),
                             SystemSpec("shared", shared.decode_dir(), shared_file)], "own", template.data_dir,
                            ["test"], exp.exp_dir / "norm_stats_compare" / system)
            base, other = table.rows
            sig = other.significance["test"]
            rows.append({"model": model_name, "system": system, "wer_own": base.wer["test"].wer,
                         "wer_shared": other.wer["test"].wer, "verdict": verdict_text(sig),
                         "p_value": None if sig is None else sig.p_value,
                         "trained": f"{yaml.safe_load((exp.exp_dir / 'config.yaml').read_text())['max_epoch']} epochs"
                                    + (f", {record.cpu_seconds:.0f} s CPU" if record.cpu_seconds else "")
                                    + (" (CPU of the resumed part only)" if "resumed" in record.source else "")})
    lines = ["# Per-system vs shared batch-norm statistics", "",
             "One trained checkpoint per model, decoded per system with its own statistics and with the mean of all "
             "systems' statistics (MAPSSWE: shared vs own; 'worse' = shared statistics significantly worse).", "",
             "| model | trained for | system | WER own stats | WER shared stats | shared vs own |",
             "|---|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['trained']} | {r['system']} | {r['wer_own']:.2f}% | {r['wer_shared']:.2f}% "
                     f"| {r['verdict']} |")
    out = exp_dir / "benchmarks"
    stem = "norm_stats" + "".join(f"_{m}" for m in args.models)
    save_report(out, stem, lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
