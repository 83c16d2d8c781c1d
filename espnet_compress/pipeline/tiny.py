"""The README's main job: the spoken_commands corpus end to end through stock ESPnet programs.

data (espeak-ng + sox) -> word token list -> feature stats -> train each system -> decode ->
sclite + MAPSSWE against the baseline -> ``report.md`` (timings, sizes, WERs, verdicts).
Every stage is restartable: rerunning skips what is already on disk.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from espnet_compress.corpus.spoken_commands import generate_corpus
from espnet_compress.export.packed_export import PACKED_NAME, export_packed
from espnet_compress.pipeline.stages import AsrExperiment, Stage, collect_stats, make_token_list, timed
from espnet_compress.scoring.compare import ComparisonTable, SystemSpec, compare
from espnet_compress.utils.io import atomic_write_text

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf" / "spoken_commands"

@dataclasses.dataclass(frozen=True)
class TinySystem:
    """One system of the tiny run.

    Attributes:
        name: label in tables and the experiment dir ``asr_<name>``.
        config: ESPnet training config.
        init_from: name of a system whose best checkpoint initialises this one (``--init_param``),
            e.g. QAT fine-tuning from the fp32 baseline.
        packed: export with ``export_packed`` and decode/score the *packed* checkpoint through the
            stock ``asr_inference`` (so the table shows real bytes on disk).
    """

    name: str
    config: Path
    init_from: Optional[str] = None
    packed: bool = False


#: The main job: fp32 stock baseline, the elastic core trained the same way, and QAT fine-tunes
#: of the baseline exported as packed 8- and 4-bit checkpoints.
DEFAULT_SYSTEMS: Tuple[TinySystem, ...] = (
    TinySystem("conformer", CONF_DIR / "train_asr_conformer_tiny.yaml"),
    TinySystem("elastic_conformer", CONF_DIR / "train_asr_elastic_conformer_tiny.yaml"),
    TinySystem("qat_8bit", CONF_DIR / "train_asr_quantized_conformer_tiny_8bit.yaml", "conformer", True),
    TinySystem("qat_4bit", CONF_DIR / "train_asr_quantized_conformer_tiny_4bit.yaml", "conformer", True),
)


@dataclasses.dataclass
class TinyRunConfig:
    """What the tiny pipeline builds; defaults are the README's main job."""

    out_dir: Path
    systems: Sequence[TinySystem] = DEFAULT_SYSTEMS
    baseline: str = "conformer"
    seed: int = 0
    num_train: int = 2000
    num_dev: int = 150
    num_test: int = 300
    nj: int = 2
    train_args: Sequence[str] = ()
    inference_config: Path = CONF_DIR / "decode_asr.yaml"

    def validate(self) -> None:
        names = [s.name for s in self.systems]
        if len(set(names)) != len(names):
            raise ValueError(f"system names must be unique, got {names}")
        if self.baseline not in names:
            raise ValueError(f"baseline '{self.baseline}' is not one of the systems {names}")
        for i, system in enumerate(self.systems):
            if not Path(system.config).is_file():
                raise FileNotFoundError(f"system '{system.name}': training config {system.config} does not exist")
            if system.init_from is not None and system.init_from not in names[:i]:
                raise ValueError(f"system '{system.name}': init_from '{system.init_from}' must be a system listed before it")
        if not Path(self.inference_config).is_file():
            raise FileNotFoundError(f"inference config {self.inference_config} does not exist")


def run_tiny(cfg: TinyRunConfig) -> ComparisonTable:
    """Run every stage, write ``<out_dir>/report.md`` and return the comparison table."""
    cfg.validate()
    out = Path(cfg.out_dir).resolve()
    data = out / "data"
    stages: List[Stage] = [timed("data", _make_data, cfg, data)]
    experiments: Dict[str, AsrExperiment] = {}
    for system in cfg.systems:
        train_args = list(cfg.train_args)
        if system.init_from is not None:
            parent = experiments[system.init_from]
            train_args += ["--init_param", str(parent.exp_dir / parent.inference_model)]
        experiments[system.name] = AsrExperiment(
            data_dir=data, train_set="train", valid_set="dev", test_sets=["test"],
            token_list=out / "token_list" / "word" / "tokens.txt", stats_dir=out / "asr_stats",
            exp_dir=out / f"asr_{system.name}", train_config=Path(system.config).resolve(),
            inference_config=Path(cfg.inference_config).resolve(), train_args=train_args,
            decode_nj=cfg.nj,
        )
    first = experiments[cfg.baseline]
    stages.append(timed("token_list", make_token_list, data / "train" / "text", first.token_list))
    stages.append(timed("collect_stats", collect_stats, first))
    specs = []
    for system in cfg.systems:
        exp = experiments[system.name]
        stages.append(timed(f"train:{system.name}", exp.train))
        if system.packed:
            packed_dir = exp.exp_dir / "packed"
            stages.append(timed(f"export_packed:{system.name}", _export_packed, exp, packed_dir))
            exp = dataclasses.replace(exp, exp_dir=packed_dir, inference_model=PACKED_NAME)
        stages.append(timed(f"decode:{system.name}", exp.decode))
        specs.append(SystemSpec(name=system.name, decode_dir=exp.decode_dir(),
                                model_file=exp.exp_dir / exp.inference_model))
    table = compare(specs, cfg.baseline, data, ["test"], out / "compare")
    stages = _with_previous_timings(stages, out / "stages.json")
    packed_reports = [out / f"asr_{s.name}" / "packed" / "size_report.json" for s in cfg.systems if s.packed]
    atomic_write_text(out / "report.md", _report(cfg, stages, table, packed_reports))
    atomic_write_text(out / "stages.json", json.dumps([dataclasses.asdict(s) for s in stages], indent=2) + "\n")
    return table


def _with_previous_timings(stages: List[Stage], previous: Path) -> List[Stage]:
    """A rerun skips finished stages; keep the wall time measured when they actually ran."""
    if not previous.exists():
        return stages
    earlier = {s["name"]: s for s in json.loads(previous.read_text()) if not s["skipped"]}
    return [Stage(s.name, earlier[s.name]["seconds"], False) if s.skipped and s.name in earlier else s
            for s in stages]


def _export_packed(exp: AsrExperiment, packed_dir: Path) -> bool:
    """Packed export of a QAT system (skipped when already exported)."""
    if (packed_dir / PACKED_NAME).exists() and (packed_dir / "config.yaml").exists():
        return False
    export_packed(exp.exp_dir / "config.yaml", exp.exp_dir / exp.inference_model, packed_dir)
    return True


def _packed_row(report: Path) -> str:
    r = json.loads(report.read_text())
    return (f"| {report.parent.parent.name[len('asr_'):]} | {r['packed_file_bytes']:,} | {r['source_checkpoint_bytes']:,} | "
            f"{r['ratio_overall']:.2f}x | {r['quantized_weights']['ratio']:.2f}x |")


def _make_data(cfg: TinyRunConfig, data: Path) -> bool:
    reports = generate_corpus(data, seed=cfg.seed, num_train=cfg.num_train, num_dev=cfg.num_dev,
                              num_test=cfg.num_test, nj=cfg.nj, progress=True)
    return any(not r.reused for r in reports)


def _report(cfg: TinyRunConfig, stages: Sequence[Stage], table: ComparisonTable,
            packed_reports: Sequence[Path] = ()) -> str:
    lines = [
        "# spoken_commands: tiny end-to-end run",
        "",
        f"Corpus: seed {cfg.seed}, {cfg.num_train} train / {cfg.num_dev} dev / {cfg.num_test} test utterances "
        "(test voices unseen in training). Training and decoding by stock `espnet2.bin` programs.",
        "",
        "## Systems",
        "",
        table.to_markdown(),
        "## Compression (packed checkpoints, bytes on disk)",
        "",
        "| system | packed file bytes | fp32 checkpoint bytes | overall ratio | quantized weights ratio |",
        "|---|---:|---:|---:|---:|",
        *[_packed_row(p) for p in packed_reports if p.exists()],
        "",
        "## Stage wall times",
        "",
        "| stage | seconds | note |",
        "|---|---:|---|",
    ]
    lines += [f"| {s.name} | {s.seconds:.1f} | {'reused from disk' if s.skipped else ''} |" for s in stages]
    return "\n".join(lines) + "\n"
