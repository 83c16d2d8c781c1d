"""One packed file for every precision: the bit-plane nested supernet on the tiny corpus.

Starts from a finished main job (``run_tiny``: the fp32 ``conformer``, its equal-update control
``fp32_finetune`` and the separately trained ``qat_8bit``/``qat_4bit``), then:

1. fine-tunes ``conf/spoken_commands/train_asr_nested_conformer_tiny_bitplane.yaml`` from the
   baseline (six systems: 8-bit full, depth 3, FFN 192, depth 2 with FFN 192, and 4- and 2-bit
   planes of the same codes) with ``run_tiny`` in ``--run_dir`` (a hard-linked copy of the main job, so finished
   stages are reused), which exports it with ``export_packed`` as ONE file of 8-bit codes;
2. decodes every system from that one file with stock ``asr_inference`` and
   ``ESPNET_COMPRESS_SYSTEM=<name>`` (the 8-bit full system is ``run_tiny``'s own decode);
3. scores them (sclite, MAPSSWE) against the fp32 control, the fp32 baseline and the separately
   trained QAT models, and compares bytes on disk: the one file against the fp32 largest system
   (the baseline's checkpoint) and against the five per-system files it replaces (``export_system``,
   each packed at its own widths).

Usage::

    python benchmarks/bitplane.py --main_job exp/tiny --run_dir exp/bitplane

Writes ``<run_dir>/bitplane.{md,json}``. Restartable: finished training, export and decodes are reused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.main_job import run_beside_main_job  # noqa: E402
from benchmarks.nested_supernet import tagged  # noqa: E402
from espnet_compress.export.packed_export import PACKED_NAME  # noqa: E402
from espnet_compress.pipeline.data import corpus_of  # noqa: E402
from espnet_compress.pipeline.stages import AsrExperiment  # noqa: E402
from espnet_compress.pipeline.tiny import CONF_DIR  # noqa: E402
from espnet_compress.utils.io import atomic_write_text  # noqa: E402

CONFIG = CONF_DIR / "train_asr_nested_conformer_tiny_bitplane.yaml"
NAME = "bitplane"
REUSED = ("token_list", "asr_stats", "asr_conformer", "asr_fp32_finetune", "asr_qat_8bit", "asr_qat_4bit",
          "data_source.json")
#: separately trained twin of a bit-plane system (same width, full network), when the main job has one
TWINS = {"int8": "qat_8bit", "int4": "qat_4bit"}


def systems() -> List[str]:
    import yaml

    return list(yaml.safe_load(CONFIG.read_text())["model_conf"]["systems"])


def train(main_job: Path, run_dir: Path) -> None:
    """``run_tiny`` with the main job's systems (reused) and the bit-plane supernet."""
    qat = {f"qat_{b}bit": CONF_DIR / f"train_asr_quantized_conformer_tiny_{b}bit.yaml" for b in (8, 4)}
    run_beside_main_job(main_job, run_dir, REUSED, {**qat, NAME: CONFIG})


def _packed_experiment(run_dir: Path) -> AsrExperiment:
    data = corpus_of(run_dir)
    return AsrExperiment(data_dir=data, train_set="train", valid_set="dev", test_sets=["test"],
                         token_list=run_dir / "token_list" / "word" / "tokens.txt", stats_dir=run_dir / "asr_stats",
                         exp_dir=run_dir / f"asr_{NAME}" / "packed", train_config=CONFIG,
                         inference_config=CONF_DIR / "decode_asr.yaml", inference_model=PACKED_NAME, decode_nj=1)


def decode_systems(run_dir: Path) -> Dict[str, Path]:
    """Every system decoded from the one packed file; returns each system's decode dir."""
    from tqdm import tqdm

    packed = _packed_experiment(run_dir)
    dirs: Dict[str, Path] = {}
    for name in tqdm(systems(), desc="systems from the one file"):
        decode = tagged(packed, f"sys_{name}", {"ESPNET_COMPRESS_SYSTEM": name})
        decode.decode()
        dirs[name] = decode.decode_dir()
    return dirs


def report(run_dir: Path, dirs: Dict[str, Path]) -> None:
    from espnet_compress.scoring.compare import SystemSpec, compare

    main = json.loads((run_dir / "compare" / "compare.json").read_text())
    specs = {s["name"]: SystemSpec(s["name"], Path(s["decode_dir"]), Path(s["model_file"])) for s in main["systems"]}
    one_file = run_dir / f"asr_{NAME}" / "packed" / PACKED_NAME
    for name, d in dirs.items():
        specs[f"{NAME}.{name}"] = SystemSpec(f"{NAME}.{name}", d, one_file)
    data = corpus_of(run_dir)
    ours = [f"{NAME}.{n}" for n in dirs]
    sections = []
    for ref, members in (("fp32_finetune", ours), ("conformer", ours)):
        table = compare([specs[ref]] + [specs[m] for m in members], ref, data, ["test"], run_dir / f"bitplane_vs_{ref}")
        sections.append(f"## Against `{ref}`\n\n" + table.to_markdown())
    for system, twin in TWINS.items():
        if twin in specs and system in dirs:
            table = compare([specs[twin], specs[f"{NAME}.{system}"]], twin, data, ["test"],
                            run_dir / f"bitplane_{system}_vs_{twin}")
            sections.append(f"## `{system}` plane against the separately trained `{twin}`\n\n" + table.to_markdown())
    sizes = _sizes(run_dir, one_file)
    lines = ["| file | bytes | / fp32 largest system |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:,} | {v / sizes['fp32 largest system (baseline checkpoint)']:.3f} |" for k, v in sizes.items()]
    text = ("# Bit-plane nested supernet: one packed file, every system\n\n"
            "Every `bitplane.*` row is decoded from the same file (ESPNET_COMPRESS_SYSTEM=<system>). Training: "
            "the supernet and every fine-tune row ran the control's schedule from the same baseline checkpoint "
            f"(same epochs and updates); the supernet runs {len(dirs)} systems per update (about {len(dirs)}x the "
            "control's compute).\n\n"
            "## Bytes on disk\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(sections) + "\n")
    atomic_write_text(run_dir / "bitplane.md", text)
    atomic_write_text(run_dir / "bitplane.json", json.dumps({"sizes": sizes, "decode_dirs": {k: str(v) for k, v in dirs.items()}}, indent=1))
    print(text)


def _sizes(run_dir: Path, one_file: Path) -> Dict[str, int]:
    sizes = {"fp32 largest system (baseline checkpoint)": (run_dir / "asr_conformer" / "valid.acc.best.pth").stat().st_size,
             "fp32 supernet checkpoint": (run_dir / f"asr_{NAME}" / "valid.acc.best.pth").stat().st_size,
             f"one bit-plane file (all {len(systems())} systems)": one_file.stat().st_size}
    separate = _separate_exports(run_dir)
    for name, nbytes in separate.items():
        sizes[f"export_system {name} (packed at its own width)"] = nbytes
    sizes[f"sum of the {len(separate)} per-system exports"] = sum(separate.values())
    for twin in ("qat_8bit", "qat_4bit"):
        packed = run_dir / f"asr_{twin}" / "packed" / PACKED_NAME
        if packed.exists():
            sizes[f"separate packed {twin}"] = packed.stat().st_size
    return sizes


def _separate_exports(run_dir: Path) -> Dict[str, int]:
    """Bytes of each system exported on its own (``export_system``: packed at the system's own
    widths): what the one file replaces. Reused when already exported."""
    from espnet_compress.export.system_export import export_system

    exp = run_dir / f"asr_{NAME}"
    out: Dict[str, int] = {}
    for name in systems():
        target = exp / "systems" / name
        if not (target / "config.yaml").exists():
            export_system(exp / "config.yaml", exp / "valid.acc.best.pth", name, target)
        out[name] = sum(f.stat().st_size for f in target.glob("*.pth"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--main_job", type=Path, required=True)
    p.add_argument("--run_dir", type=Path, required=True)
    args = p.parse_args()
    train(args.main_job, args.run_dir)
    report(args.run_dir, decode_systems(args.run_dir))


if __name__ == "__main__":
    main()
