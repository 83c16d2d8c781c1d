"""The README's main job: a corpus end to end through stock ESPnet programs.

data (the synthetic spoken_commands corpus made with espeak-ng + sox, or the user's own Kaldi data
dir via ``--data_dir``) -> word token list -> feature stats -> train each system -> decode ->
sclite + MAPSSWE against the baseline -> ``report.md`` (timings, sizes, WERs, verdicts).
Every stage is restartable: rerunning skips what is already on disk.

The elastic core is shown to *be* the stock Conformer without training it a second time: the
baseline's checkpoint is loaded into ``elastic_conformer`` (the baseline's config with the encoder
swapped) and decoded by the stock ``asr_inference``; the report compares hypotheses and scores
utterance by utterance. A second, identical training used to double the job's length for that.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from espnet_compress.corpus.kaldi_dir import CORPUS_SUBSETS
from espnet_compress.corpus.spoken_commands import generate_corpus
from espnet_compress.export.packed_export import PACKED_NAME, export_packed
from espnet_compress.pipeline.convergence import StoppingRule, TrainingSummary, plot_curves, read_curve, training_summary
from espnet_compress.pipeline.data import SYNTHETIC_DATA, UserCorpus, resolve_corpus
from espnet_compress.pipeline.stages import AsrExperiment, Stage, collect_stats, make_token_list, read_config, timed
from espnet_compress.scoring.compare import ComparisonTable, SystemSpec, compare
from espnet_compress.utils.io import atomic_write_text

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf" / "spoken_commands"


@dataclasses.dataclass(frozen=True)
class TinySystem:
    """One trained system of the tiny run.

    Attributes:
        name: label in tables and the experiment dir ``asr_<name>``.
        config: ESPnet training config.
        init_from: name of a system whose best checkpoint initialises this one (``--init_param``),
            e.g. QAT fine-tuning from the fp32 baseline.
        packed: export with ``export_packed`` and decode/score the *packed* checkpoint through the
            stock ``asr_inference`` (so the table shows real bytes on disk).
        control: the system trained with the same compute (same start, epochs and schedule) that
            this one's verdict is made against, besides the baseline: a QAT fine-tune trains longer
            than the baseline, so "as good as the baseline" may only measure the extra epochs.
    """

    name: str
    config: Path
    init_from: Optional[str] = None
    packed: bool = False
    control: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ReloadedSystem:
    """A system that is not trained: a trained system's checkpoint decoded with another encoder class.

    Its config is the source's ``config.yaml`` (as ``asr_train`` wrote it) with ``encoder`` swapped;
    its model file is a link to the source's checkpoint (same bytes). Decoding it with the stock
    ``asr_inference`` shows that the two encoder classes compute the same function, which is what
    "a stock checkpoint loads into the elastic core unchanged" promises.

    Attributes:
        name: label in tables and the dir ``asr_<name>``.
        source: the trained system whose checkpoint is loaded.
        encoder: the registered encoder name that replaces the source's.
    """

    name: str
    source: str
    encoder: str


#: The main job: the fp32 stock baseline (trained to its early-stopping rule), QAT fine-tunes of it
#: exported as packed 8- and 4-bit checkpoints, and their equal-compute control (the baseline
#: fine-tuned in fp32 for the same epochs with the same schedule); the elastic core is the
#: baseline's checkpoint reloaded (no training).
DEFAULT_SYSTEMS: Tuple[TinySystem, ...] = (
    TinySystem("conformer", CONF_DIR / "train_asr_conformer_tiny.yaml"),
    TinySystem("fp32_finetune", CONF_DIR / "train_asr_conformer_tiny_finetune.yaml", "conformer"),
    TinySystem("qat_8bit", CONF_DIR / "train_asr_quantized_conformer_tiny_8bit.yaml", "conformer", True,
               "fp32_finetune"),
    TinySystem("qat_4bit", CONF_DIR / "train_asr_quantized_conformer_tiny_4bit.yaml", "conformer", True,
               "fp32_finetune"),
)
DEFAULT_RELOADED: Tuple[ReloadedSystem, ...] = (ReloadedSystem("elastic_conformer", "conformer", "elastic_conformer"),)


@dataclasses.dataclass
class TinyRunConfig:
    """What the tiny pipeline builds; defaults are the README's main job.

    ``data_dir``: the user's corpus (``train``/``dev``/``test`` Kaldi data dirs); None makes the
    synthetic corpus of ``num_train``/``num_dev``/``num_test`` utterances (seed ``seed``) instead.
    """

    out_dir: Path
    systems: Sequence[TinySystem] = DEFAULT_SYSTEMS
    reloaded: Sequence[ReloadedSystem] = DEFAULT_RELOADED
    baseline: str = "conformer"
    seed: int = 0
    num_train: int = 2000
    num_dev: int = 150
    num_test: int = 300
    nj: int = 2
    train_args: Sequence[str] = ()
    inference_config: Path = CONF_DIR / "decode_asr.yaml"
    data_dir: Optional[Path] = None

    def validate(self) -> None:
        names = [s.name for s in self.systems]
        all_names = names + [r.name for r in self.reloaded]
        if len(set(all_names)) != len(all_names):
            raise ValueError(f"system names must be unique, got {all_names}")
        if self.baseline not in all_names:
            raise ValueError(f"baseline '{self.baseline}' is not one of the systems {all_names}")
        for i, system in enumerate(self.systems):
            if not Path(system.config).is_file():
                raise FileNotFoundError(f"system '{system.name}': training config {system.config} does not exist")
            if system.init_from is not None and system.init_from not in names[:i]:
                raise ValueError(f"system '{system.name}': init_from '{system.init_from}' must be a system listed before it")
            if system.control is not None and system.control not in names[:i]:
                raise ValueError(f"system '{system.name}': control '{system.control}' must be a system listed before it")
        packed = [s.name for s in self.systems if s.packed]
        for reloaded in self.reloaded:
            if reloaded.source not in names:
                raise ValueError(f"reloaded system '{reloaded.name}': source '{reloaded.source}' is not a trained "
                                 f"system {names}")
            if reloaded.source in packed:
                raise ValueError(f"reloaded system '{reloaded.name}': source '{reloaded.source}' is decoded from its "
                                 f"packed export; reload the fp32 system it was fine-tuned from instead")
        if not Path(self.inference_config).is_file():
            raise FileNotFoundError(f"inference config {self.inference_config} does not exist")


@dataclasses.dataclass(frozen=True)
class PlannedStage:
    """A stage of the run before it runs: what it does and how long it took on the project's machine.

    ``run`` returns whether it did work (False: its outputs were already on disk).
    """

    name: str
    run: Callable[[], bool]
    expected_seconds: float


#: Measured on the project's 2-core machine, for the duration printed when the job starts.
#: Interpreter start plus ESPnet import of one stock program:
PROGRAM_START_SECONDS = 15.0
#: espeak-ng + sox for one synthetic utterance (2 jobs):
SECONDS_PER_MADE_UTTERANCE = 0.025
#: one training utterance through one epoch of the tiny Conformer (batches, validation, checkpoints);
#: measured 0.0149 for the fp32 baseline and 0.0145 for its 4-bit QAT fine-tune running alone with
#: the default threads (a newcomer's main job, 2026-12-05); 0.018-0.024 with one thread beside a
#: second training
SECONDS_PER_TRAINED_UTTERANCE = 0.015
#: one utterance of joint CTC/attention beam search (beam 5), per decoding job:
SECONDS_PER_DECODED_UTTERANCE = 0.25
#: feature statistics (front end over train + dev):
SECONDS_PER_STATS_UTTERANCE = 0.005


def run_tiny(cfg: TinyRunConfig) -> ComparisonTable:
    """Run every stage, write ``<out_dir>/report.md`` and return the comparison table.

    The configs and the user's corpus are validated before anything is written. The expected
    duration is logged at the start and every stage logs ``stage i/N`` with the elapsed time.
    """
    cfg.validate()
    out = Path(cfg.out_dir).resolve()
    corpus = resolve_corpus(out, cfg.data_dir, [s.config for s in cfg.systems])
    data = corpus.path if corpus is not None else out / SYNTHETIC_DATA
    counts = corpus.counts if corpus is not None else dict(zip(CORPUS_SUBSETS, (cfg.num_train, cfg.num_dev, cfg.num_test)))
    experiments = _experiments(cfg, out, data)
    first = experiments.get(cfg.baseline, experiments[cfg.systems[0].name])  # its config makes the stats

    plan: List[PlannedStage] = [
        # a user's corpus was validated above and is used in place: nothing to make
        PlannedStage("data", lambda: corpus is None and _make_data(cfg, data),
                     0.0 if corpus is not None else sum(counts.values()) * SECONDS_PER_MADE_UTTERANCE),
        PlannedStage("token_list", lambda: make_token_list(data / "train" / "text", first.token_list),
                     PROGRAM_START_SECONDS),
        PlannedStage("collect_stats", lambda: collect_stats(first),
                     2 * PROGRAM_START_SECONDS + (counts["train"] + counts["dev"]) * SECONDS_PER_STATS_UTTERANCE),
    ]
    decode_seconds = PROGRAM_START_SECONDS + counts["test"] * SECONDS_PER_DECODED_UTTERANCE / max(1, cfg.nj)
    decoded: Dict[str, AsrExperiment] = {}
    for system in cfg.systems:
        exp = experiments[system.name]
        plan.append(PlannedStage(f"train:{system.name}", exp.train, _training_seconds(exp, counts["train"])))
        if system.packed:
            packed_dir = exp.exp_dir / "packed"
            export = functools.partial(_export_packed, exp, packed_dir)
            plan.append(PlannedStage(f"export_packed:{system.name}", export, PROGRAM_START_SECONDS))
            exp = dataclasses.replace(exp, exp_dir=packed_dir, inference_model=PACKED_NAME)
        plan.append(PlannedStage(f"decode:{system.name}", exp.decode, decode_seconds))
        decoded[system.name] = exp
        for reloaded in (r for r in cfg.reloaded if r.source == system.name):
            twin = dataclasses.replace(exp, exp_dir=out / f"asr_{reloaded.name}")
            reload = functools.partial(_reload, experiments[system.name], twin, reloaded.encoder)
            plan.append(PlannedStage(f"reload:{reloaded.name}", reload, 1.0))
            plan.append(PlannedStage(f"decode:{reloaded.name}", twin.decode, decode_seconds))
            decoded[reloaded.name] = twin
    specs = [SystemSpec(name=n, decode_dir=decoded[n].decode_dir(),
                        model_file=decoded[n].exp_dir / decoded[n].inference_model) for n in _table_order(cfg)]
    tables: List[ComparisonTable] = []
    controlled: List[ComparisonTable] = []

    by_name = {spec.name: spec for spec in specs}

    def score() -> bool:
        """sclite + MAPSSWE against the baseline, then each controlled system against its control;
        always rerun (seconds), as a rerun may have decoded more systems."""
        tables.append(compare(specs, cfg.baseline, data, ["test"], out / "compare"))
        for control, members in _controlled(cfg).items():
            controlled.append(compare([by_name[control]] + [by_name[m] for m in members], control, data, ["test"],
                                      out / f"compare_vs_{control}"))
        return True

    plan.append(PlannedStage("score", score, 2 * PROGRAM_START_SECONDS))

    stages = _run_plan(plan, out)
    table = tables[0]
    identities = [_identity(r, decoded[r.source], decoded[r.name]) for r in cfg.reloaded]
    stages = _with_previous_timings(stages, out / "stages.json")
    packed_reports = [out / f"asr_{s.name}" / "packed" / "size_report.json" for s in cfg.systems if s.packed]
    trainings = [_training_row(s, experiments[s.name], stages) for s in cfg.systems]
    curve_plot = _plot_scratch_curves(cfg, experiments, out / "dev_acc.png")
    atomic_write_text(out / "report.md", _report(cfg, corpus, stages, table, identities, packed_reports,
                                                 controlled, trainings, curve_plot))
    return table


def _controlled(cfg: TinyRunConfig) -> Dict[str, List[str]]:
    """control -> the systems whose verdict is made against it, in listing order."""
    groups: Dict[str, List[str]] = {}
    for system in cfg.systems:
        if system.control is not None:
            groups.setdefault(system.control, []).append(system.name)
    return groups


@dataclasses.dataclass(frozen=True)
class TrainingRow:
    """What one system was trained for: the numbers every table's reader needs to judge a verdict."""

    name: str
    init_from: Optional[str]
    summary: TrainingSummary
    seconds: Optional[float]


def _training_row(system: TinySystem, exp: AsrExperiment, stages: Sequence[Stage]) -> TrainingRow:
    seconds = next((s.seconds for s in stages if s.name == f"train:{system.name}" and not s.skipped), None)
    return TrainingRow(system.name, system.init_from, training_summary(exp.exp_dir), seconds)


def _plot_scratch_curves(cfg: TinyRunConfig, experiments: Dict[str, AsrExperiment], path: Path) -> Optional[Path]:
    """Dev accuracy per epoch of the systems trained from scratch (fine-tunes restart at epoch 1 and
    would not share the axis), with the baseline's stopping rule marked: did it reach its plateau?"""
    scratch = {s.name: read_curve(experiments[s.name].exp_dir) for s in cfg.systems if s.init_from is None}
    if not scratch:
        return None
    baseline = experiments.get(cfg.baseline, experiments[cfg.systems[0].name])
    return plot_curves(scratch, path, StoppingRule.from_config(read_config(baseline.exp_dir / "config.yaml")))


def _experiments(cfg: TinyRunConfig, out: Path, data: Path) -> Dict[str, AsrExperiment]:
    """One stock-ESPnet experiment per trained system, sharing the token list and feature stats."""
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
    return experiments


def _table_order(cfg: TinyRunConfig) -> List[str]:
    """Systems in table order: each trained system followed by its reloaded twins."""
    order: List[str] = []
    for system in cfg.systems:
        order.append(system.name)
        order += [r.name for r in cfg.reloaded if r.source == system.name]
    return order


def _training_seconds(exp: AsrExperiment, num_train: int) -> float:
    """Expected training time: epochs (the config's, or ``--max_epoch`` among the extra arguments)
    times training utterances at the measured rate; an upper bound when early stopping is on."""
    epochs = int(read_config(exp.train_config).get("max_epoch", 0))
    args = list(exp.train_args)
    for i, arg in enumerate(args[:-1]):
        if arg == "--max_epoch":
            epochs = int(args[i + 1])
    return PROGRAM_START_SECONDS + epochs * num_train * SECONDS_PER_TRAINED_UTTERANCE


def _run_plan(plan: Sequence[PlannedStage], out: Path) -> List[Stage]:
    """Run the stages in order, logging the expected total first and ``stage i/N`` progress with
    the elapsed time and the expected time left (finished stages are skipped in seconds, so on a
    rerun the time left drops as they pass)."""
    log.info("main job in %s: %d stages, expected at most about %s for a fresh run on a 2-core CPU "
             "(every training to its epoch cap; the stopping rule usually ends the baseline sooner; "
             "stages whose outputs exist are skipped)", out, len(plan), _minutes(sum(p.expected_seconds for p in plan)))
    start = time.perf_counter()
    stages: List[Stage] = []
    for i, planned in enumerate(plan, start=1):
        left = sum(p.expected_seconds for p in plan[i - 1:])
        log.info("stage %d/%d %s: starting (expected %s; elapsed %s, about %s left)", i, len(plan), planned.name,
                 _minutes(planned.expected_seconds), _minutes(time.perf_counter() - start), _minutes(left))
        stages.append(timed(planned.name, planned.run))
        # after every stage, so an interrupted job keeps the wall times of what it finished
        _save_timings(stages, out / "stages.json")
    log.info("all %d stages finished in %s", len(plan), _minutes(time.perf_counter() - start))
    return stages


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _reload(source: AsrExperiment, twin: AsrExperiment, encoder: str) -> bool:
    """Write ``twin``'s config (the source's trained config, encoder swapped) and link its model
    file to the source's checkpoint. Skipped when both exist; the config is written last."""
    config = twin.exp_dir / "config.yaml"
    model = twin.exp_dir / twin.inference_model
    if config.exists() and model.exists():
        return False
    conf = read_config(source.exp_dir / "config.yaml")
    conf["encoder"] = encoder
    twin.exp_dir.mkdir(parents=True, exist_ok=True)
    if model.is_symlink():
        model.unlink()
    model.symlink_to(os.path.relpath(source.exp_dir / source.inference_model, twin.exp_dir))
    atomic_write_text(config, yaml.safe_dump(conf, sort_keys=False))
    return True


@dataclasses.dataclass(frozen=True)
class Identity:
    """Per-utterance comparison of a reloaded system's decoding with its source's."""

    name: str
    source: str
    encoder: str
    utterances: int
    same_hypotheses: int
    max_score_difference: float

    @property
    def identical(self) -> bool:
        return self.same_hypotheses == self.utterances and self.max_score_difference == 0.0


def _identity(reloaded: ReloadedSystem, source: AsrExperiment, twin: AsrExperiment) -> Identity:
    """Compare hypotheses and beam-search scores of every test utterance (test set ``test``)."""
    hyps = [_decoded(exp, "text") for exp in (source, twin)]
    scores = [{k: float(_NUMBER.search(v).group()) for k, v in _decoded(exp, "score").items()}
              for exp in (source, twin)]
    if set(hyps[0]) != set(hyps[1]) or set(scores[0]) != set(scores[1]):
        raise ValueError(f"{reloaded.name} and {reloaded.source} decoded different utterances; "
                         f"see {twin.decode_dir()} and {source.decode_dir()}")
    same = sum(hyps[0][k] == hyps[1][k] for k in hyps[0])
    diff = max((abs(scores[0][k] - scores[1][k]) for k in scores[0]), default=0.0)
    result = Identity(reloaded.name, reloaded.source, reloaded.encoder, len(hyps[0]), same, diff)
    if not result.identical:
        log.warning("%s differs from %s: %d/%d identical hypotheses, max score difference %.3g",
                    reloaded.name, reloaded.source, same, result.utterances, diff)
    return result


_NUMBER = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|-?inf|nan")


def _decoded(exp: AsrExperiment, field: str) -> Dict[str, str]:
    """``utt -> value`` of asr_inference's ``1best_recog/<field>`` over all decoding jobs of ``test``."""
    values: Dict[str, str] = {}
    for part in sorted((exp.decode_dir() / "test" / "logdir").glob(f"output.*/1best_recog/{field}")):
        for line in part.read_text().splitlines():
            key, _, value = line.partition(" ")
            values[key] = value.strip()
    return values


def _save_timings(stages: List[Stage], path: Path) -> None:
    """Merge the stages run so far into ``stages.json`` (a skipped stage keeps its earlier time)."""
    merged = {s["name"]: s for s in json.loads(path.read_text())} if path.exists() else {}
    for stage in _with_previous_timings(stages, path):
        merged[stage.name] = dataclasses.asdict(stage)
    atomic_write_text(path, json.dumps(list(merged.values()), indent=2) + "\n")


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


def _packed_groups_table(reports: Sequence[Path]) -> List[str]:
    """Bytes of every tensor group (front end, blocks, embedding, output layer, norms/biases,
    other) per packed system: shows where a file is still far from the bit-width limit."""
    rows = [(p.parent.parent.name[len("asr_"):], json.loads(p.read_text()).get("tensor_groups")) for p in reports]
    rows = [(name, groups) for name, groups in rows if groups]
    if not rows:
        return []
    names = list(rows[0][1])
    return ["Bytes per tensor group (quantized tensors / tensors in the group):", "",
            "| system | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
            *(f"| {system} | " + " | ".join(f"{g[n]['bytes']:,} ({g[n]['quantized']}/{g[n]['tensors']})" for n in names)
              + " |" for system, g in rows), ""]


def _make_data(cfg: TinyRunConfig, data: Path) -> bool:
    reports = generate_corpus(data, seed=cfg.seed, num_train=cfg.num_train, num_dev=cfg.num_dev,
                              num_test=cfg.num_test, nj=cfg.nj, progress=True)
    return any(not r.reused for r in reports)


def _report(cfg: TinyRunConfig, corpus: Optional[UserCorpus], stages: Sequence[Stage], table: ComparisonTable,
            identities: Sequence[Identity] = (), packed_reports: Sequence[Path] = (),
            controlled: Sequence[ComparisonTable] = (), trainings: Sequence[TrainingRow] = (),
            curve_plot: Optional[Path] = None) -> str:
    if corpus is None:
        corpus_line = (f"Corpus: synthetic spoken_commands, seed {cfg.seed}, {cfg.num_train} train / {cfg.num_dev} dev / "
                       f"{cfg.num_test} test utterances (test voices unseen in training).")
    else:
        corpus_line = (f"Corpus: `{corpus.path}`, {corpus.counts['train']} train / {corpus.counts['dev']} dev / "
                       f"{corpus.counts['test']} test utterances, {corpus.sample_rate.hz} Hz.")
    lines = [
        "# Tiny end-to-end run",
        "",
        corpus_line + " Training and decoding by stock `espnet2.bin` programs.",
        "",
        "## Systems",
        "",
        table.to_markdown(),
    ]
    for control in controlled:
        lines += [f"## Against the equal-compute control `{control.baseline}`",
                  "",
                  f"These systems trained longer than the baseline they start from; `{control.baseline}` started from "
                  "the same checkpoint and trained as long with the same schedule in fp32, so this verdict is what "
                  "quantization costs.",
                  "",
                  control.to_markdown()]
    if trainings:
        lines += [
            "## What each system was trained for",
            "",
            "| system | initialised from | rule | epochs run | kept epoch | updates | training wall s |",
            "|---|---|---|---:|---:|---:|---:|",
            *[f"| {t.name} | {t.init_from or 'scratch'} | {t.summary.rule.describe()} | {t.summary.epochs} | "
              f"{t.summary.kept_epoch} | {t.summary.updates} | "
              f"{'reused' if t.seconds is None else f'{t.seconds:.0f}'} |" for t in trainings],
            "",
            "Updates: optimizer steps of that training alone (a fine-tune adds them to its parent's).",
            "",
        ]
    if curve_plot is not None:
        lines += [f"![dev accuracy per epoch]({curve_plot.name})", ""]
    if identities:
        lines += [
            "## Reloaded systems (no training): the source's checkpoint decoded with another encoder class",
            "",
            "| system | encoder | checkpoint of | test utterances | identical hypotheses | max abs score difference | verdict |",
            "|---|---|---|---:|---:|---:|---|",
            *[f"| {i.name} | `{i.encoder}` | {i.source} | {i.utterances} | {i.same_hypotheses} | "
              f"{i.max_score_difference:.3g} | {'identical' if i.identical else 'DIFFERENT'} |" for i in identities],
            "",
            "Scores: the beam-search score of the best hypothesis, as `asr_inference` writes it "
            "(`1best_recog/score`, 4 decimals).",
            "",
        ]
    lines += [
        "## Compression (packed checkpoints, bytes on disk)",
        "",
        "| system | packed file bytes | fp32 checkpoint bytes | overall ratio | quantized weights ratio |",
        "|---|---:|---:|---:|---:|",
        *[_packed_row(p) for p in packed_reports if p.exists()],
        "",
        *_packed_groups_table([p for p in packed_reports if p.exists()]),
        "## Stage wall times",
        "",
        "| stage | seconds | note |",
        "|---|---:|---|",
    ]
    lines += [f"| {s.name} | {s.seconds:.1f} | {'reused from disk' if s.skipped else ''} |" for s in stages]
    return "\n".join(lines) + "\n"
