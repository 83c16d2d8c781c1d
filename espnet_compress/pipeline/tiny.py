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
from typing import Dict, List, Sequence, Tuple

from espnet_compress.corpus.spoken_commands import generate_corpus
from espnet_compress.pipeline.stages import AsrExperiment, Stage, collect_stats, make_token_list, timed
from espnet_compress.scoring.compare import ComparisonTable, SystemSpec, compare
from espnet_compress.utils.io import atomic_write_text

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf" / "spoken_commands"

#: (system name, training config): the fp32 stock baseline first, then our elastic core.
DEFAULT_SYSTEMS: Tuple[Tuple[str, Path], ...] = (
    ("conformer", CONF_DIR / "train_asr_conformer_tiny.yaml"),
    ("elastic_conformer", CONF_DIR / "train_asr_elastic_conformer_tiny.yaml"),
)


@dataclasses.dataclass
class TinyRunConfig:
    """What the tiny pipeline builds; defaults are the README's main job."""

    out_dir: Path
    systems: Sequence[Tuple[str, Path]] = DEFAULT_SYSTEMS
    baseline: str = "conformer"
    seed: int = 0
    num_train: int = 2000
    num_dev: int = 150
    num_test: int = 300
    nj: int = 2
    train_args: Sequence[str] = ()
    inference_config: Path = CONF_DIR / "decode_asr.yaml"

    def validate(self) -> None:
        names = [n for n, _ in self.systems]
        if len(set(names)) != len(names):
            raise ValueError(f"system names must be unique, got {names}")
        if self.baseline not in names:
            raise ValueError(f"baseline '{self.baseline}' is not one of the systems {names}")
        for name, config in self.systems:
            if not Path(config).is_file():
                raise FileNotFoundError(f"system '{name}': training config {config} does not exist")
        if not Path(self.inference_config).is_file():
            raise FileNotFoundError(f"inference config {self.inference_config} does not exist")


def run_tiny(cfg: TinyRunConfig) -> ComparisonTable:
    """Run every stage, write ``<out_dir>/report.md`` and return the comparison table."""
    cfg.validate()
    out = Path(cfg.out_dir).resolve()
    data = out / "data"
    stages: List[Stage] = [
        timed("data", _make_data, cfg, data),
    ]
    experiments: Dict[str, AsrExperiment] = {
        name: AsrExperiment(
            data_dir=data, train_set="train", valid_set="dev", test_sets=["test"],
            token_list=out / "token_list" / "word" / "tokens.txt", stats_dir=out / "asr_stats",
            exp_dir=out / f"asr_{name}", train_config=Path(config).resolve(),
            inference_config=Path(cfg.inference_config).resolve(), train_args=list(cfg.train_args),
            decode_nj=cfg.nj,
        )
        for name, config in cfg.systems
    }
    first = experiments[cfg.baseline]
    stages.append(timed("token_list", make_token_list, data / "train" / "text", first.token_list))
    stages.append(timed("collect_stats", collect_stats, first))
    for name, exp in experiments.items():
        stages.append(timed(f"train:{name}", exp.train))
        stages.append(timed(f"decode:{name}", exp.decode))
    specs = [
        SystemSpec(name=name, decode_dir=exp.decode_dir(), model_file=exp.exp_dir / exp.inference_model)
        for name, exp in experiments.items()
    ]
    table = compare(specs, cfg.baseline, data, ["test"], out / "compare")
    atomic_write_text(out / "report.md", _report(cfg, stages, table))
    atomic_write_text(out / "stages.json", json.dumps([dataclasses.asdict(s) for s in stages], indent=2) + "\n")
    return table


def _make_data(cfg: TinyRunConfig, data: Path) -> bool:
    reports = generate_corpus(data, seed=cfg.seed, num_train=cfg.num_train, num_dev=cfg.num_dev,
                              num_test=cfg.num_test, nj=cfg.nj, progress=True)
    return any(not r.reused for r in reports)


def _report(cfg: TinyRunConfig, stages: Sequence[Stage], table: ComparisonTable) -> str:
    lines = [
        "# spoken_commands: tiny end-to-end run",
        "",
        f"Corpus: seed {cfg.seed}, {cfg.num_train} train / {cfg.num_dev} dev / {cfg.num_test} test utterances "
        "(test voices unseen in training). Training and decoding by stock `espnet2.bin` programs.",
        "",
        "## Systems",
        "",
        table.to_markdown(),
        "## Stage wall times",
        "",
        "| stage | seconds | note |",
        "|---|---:|---|",
    ]
    lines += [f"| {s.name} | {s.seconds:.1f} | {'reused from disk' if s.skipped else ''} |" for s in stages]
    return "\n".join(lines) + "\n"
