"""Composed features: a 2-block foldable seed, quantized, trained as nested systems, against the
4-block fp32 baseline.

One training of ``conf/spoken_commands/train_asr_composed_tiny.yaml`` holds three systems of one set
of weights: ``deep`` (the seed unfolded to depth 4, fp32, the teacher), ``deep4`` (the same at 4 bits,
encoder and decoder) and ``seed4`` (the seed at its own depth 2, 4 bits). Each system is decoded from
the one checkpoint by stock ``asr_inference`` (``ESPNET_COMPRESS_SYSTEM``), exported on its own
(``export_system``: packed where quantized), and scored against the 4-block fp32 baseline trained
with the same epochs (sclite + MAPSSWE). Targets (issue "one encoder per host"): ``deep4``'s whole
exported file >= 10x smaller than the baseline's checkpoint with no significant WER increase.

Usage::

    nice -n 19 .venv/bin/python benchmarks/composition.py --exp_dir exp/tiny

Restartable; outputs ``<exp_dir>/benchmarks/composition.{md,json}`` and
``composition_wer_vs_bytes.png``; trainings under ``<exp_dir>/benchmarks/composition/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from nested_supernet import (  # noqa: E402
    BASELINE_CONFIG,
    add_common_args,
    begin,
    find_baseline,
    plot_setup,
    prepare_corpus,
    save_plot,
    tagged,
    timed_train,
)

from espnet_compress.export.system_export import export_system  # noqa: E402
from espnet_compress.pipeline.convergence import training_summary  # noqa: E402
from espnet_compress.scoring.compare import SystemSpec, compare, verdict_text  # noqa: E402
from espnet_compress.utils.io import atomic_write_text  # noqa: E402

log = logging.getLogger("composition")
COMPOSED_CONFIG = REPO / "conf" / "spoken_commands" / "train_asr_composed_tiny.yaml"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_args(argv)
    train_args = begin(args)
    exp_dir = args.exp_dir.resolve()
    bench = exp_dir / "benchmarks" / "composition"
    template = prepare_corpus(args)
    composed = dataclasses.replace(template, exp_dir=bench / "asr_composed", train_config=COMPOSED_CONFIG,
                                   train_args=train_args)
    baseline = dataclasses.replace(template, exp_dir=bench / "asr_baseline4", train_config=BASELINE_CONFIG,
                                   train_args=train_args)
    found = find_baseline(exp_dir, args.max_epoch, baseline.inference_model)
    if found is not None:
        log.info("reusing the fp32 baseline %s", found)
        baseline = dataclasses.replace(baseline, exp_dir=found)
    records = {name: timed_train(name, exp, args.max_epoch)
               for name, exp in tqdm([("baseline4", baseline), ("composed", composed)], desc="train", unit="model")}

    systems = list(yaml.safe_load(COMPOSED_CONFIG.read_text())["model_conf"]["systems"])
    decodes = {s: tagged(composed, f"sys_{s}", {"ESPNET_COMPRESS_SYSTEM": s}) for s in systems}
    for dec in tqdm(list(decodes.values()) + [baseline], desc="decode", unit="system"):
        dec.decode()
    exports: Dict[str, dict] = {}
    for s in tqdm(systems, desc="export", unit="system"):
        done = composed.exp_dir / "systems" / s / "export.json"
        if not done.exists():
            res = export_system(composed.exp_dir / "config.yaml", composed.exp_dir / composed.inference_model, s,
                                done.parent)
            atomic_write_text(done, json.dumps({"model_file": str(res.model_file), "packed": res.packed,
                                                "bytes": res.model_file.stat().st_size,
                                                "params": res.num_params}, indent=2) + "\n")
        exports[s] = json.loads(done.read_text())

    base_file = baseline.exp_dir / baseline.inference_model
    specs = [SystemSpec("baseline4", baseline.decode_dir(), base_file)]
    specs += [SystemSpec(s, decodes[s].decode_dir(), Path(exports[s]["model_file"]), exports[s]["params"]) for s in systems]
    table = compare(specs, "baseline4", template.data_dir, ["test"], bench / "compare")
    base_bytes = base_file.stat().st_size
    one_file = (composed.exp_dir / composed.inference_model).stat().st_size
    trained = {name: f"{training_summary(r.exp_dir).describe()}, {r.time_text()}" for name, r in records.items()}
    rows = []
    for row in table.rows:
        sig = row.significance.get("test")
        size = base_bytes if row.spec.name == "baseline4" else exports[row.spec.name]["bytes"]
        rows.append({"system": row.spec.name, "wer": row.wer["test"].wer, "bytes": size, "ratio": base_bytes / size,
                     "params": row.num_params, "verdict": verdict_text(sig),
                     "p_value": None if sig is None else sig.p_value,
                     "trained": trained["baseline4" if row.spec.name == "baseline4" else "composed"]})
    lines = ["# Composed features: 2-block foldable seed x 4-bit x nested systems", "",
             f"One checkpoint for all three systems: {one_file:,} bytes ({base_bytes / one_file:.2f}x smaller than "
             f"the baseline's). MAPSSWE against the 4-block fp32 baseline (alpha 0.05).", "",
             "| system | trained for | parameters | exported bytes | x smaller | WER test | vs baseline |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['trained']} | {r['params'] or 0:,} | {r['bytes']:,} | {r['ratio']:.1f}x "
                     f"| {r['wer']:.2f}% | {r['verdict']} |")
    out = exp_dir / "benchmarks"
    atomic_write_text(out / "composition.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "composition.json", json.dumps({"rows": rows, "one_checkpoint_bytes": one_file}, indent=2) + "\n")
    plt = plot_setup()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["bytes"] / 1e6, r["wer"], label=f"{r['system']} ({r['verdict']})",
                   marker="s" if r["system"] == "baseline4" else "o")
    ax.set_xscale("log")
    save_plot(fig, ax, out / "composition_wer_vs_bytes.png", "exported file (MB, log)", "WER test (%)",
              "2-block seed: fold x 4-bit x nested")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
