"""All-in-one nested supernet vs individually trained systems on the tiny spoken_commands corpus.

What it measures (arXiv 2406.10160's claims, at toy scale):

* one training run of ``conf/spoken_commands/train_asr_nested_conformer_tiny.yaml`` (systems
  ``full``, ``depth3``, ``ffn192``, ``int4`` sharing one set of weights) against four separate
  trainings of their "twins" (``train_asr_conformer_tiny.yaml``, ``..._depth3.yaml``,
  ``..._ffn192.yaml``, ``train_asr_quantized_conformer_tiny_4bit_scratch.yaml``), all for the same
  number of epochs through stock ``espnet2.bin.asr_train``;
* WER of every nested system, decoded from the ONE all-in-one checkpoint by stock
  ``asr_inference`` with ``ESPNET_COMPRESS_SYSTEM=<name>``, vs its twin (sclite + MAPSSWE);
* storage: the one all-in-one checkpoint vs the K per-system exports (``export_system``) and the
  K twins' checkpoints (the 4-bit twin packed), each as a ratio to the largest system's export;
* training cost: wall time of the one pass vs the sum of the separate trainings;
* with ``--control_epochs N``, the equal-compute control of ``full``: the fp32 baseline config
  trained from scratch under the same stopping rule with its cap raised to N epochs (the one pass
  costs about two baseline trainings, so N = 2x the baseline's cap spends what the all-in-one
  model spent); ``full`` against it says whether the nested model is better or only trained more.
  The dev-accuracy curves of the baseline, the control and the all-in-one model are plotted.

Usage (reusing the main job's data, token list, stats and fp32 baseline when compatible)::

    nice -n 19 .venv/bin/python benchmarks/nested_supernet.py --exp_dir exp/tiny
    # and the equal-compute control of 'full' (baseline config, twice its epoch cap, same stopping rule):
    nice -n 19 .venv/bin/python benchmarks/nested_supernet.py --exp_dir exp/tiny --control_epochs 160
    # quick check on a fresh, small corpus (a smoke test, not a result):
    nice -n 19 .venv/bin/python benchmarks/nested_supernet.py --exp_dir /tmp/bench_check \\
        --num_train 40 --num_dev 8 --num_test 12 --max_epoch 1

Everything is restartable: finished trainings, decodes and exports are reused (a training dir
whose ``config.yaml`` has a different ``max_epoch`` is an error, not silently reused). Outputs:
``<exp_dir>/benchmarks/nested_supernet/`` (trainings, decodes, exports, scoring) and
``<exp_dir>/benchmarks/nested_supernet.{md,json}`` + ``nested_supernet_wer_vs_bytes.png``
(``nested_supernet_<tag>.*`` and ``asr_nested_<tag>/`` for a ``--tag``ged variant such as the sampled
``train_asr_nested_conformer_tiny_random1.yaml``; the twins are trained once and shared).

This module also holds the helpers ``benchmarks/foldable.py`` imports (corpus set-up, timed
training, decoding under an environment/plan into its own directory).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from espnet_compress.env import DECODE_ONLY  # noqa: E402
from espnet_compress.pipeline.convergence import plot_curves, read_curve, training_summary  # noqa: E402
from espnet_compress.pipeline.data import SYNTHETIC_DATA, resolve_corpus  # noqa: E402
from espnet_compress.pipeline.stages import (  # noqa: E402
    AsrExperiment,
    collect_stats,
    make_token_list,
    training_finished,
)
from espnet_compress.pipeline.tiny import CONF_DIR, DEFAULT_SYSTEMS  # noqa: E402
from espnet_compress.utils.io import atomic_write_text, exclusive  # noqa: E402

log = logging.getLogger("benchmark")

BASELINE_CONFIG = CONF_DIR / "train_asr_conformer_tiny.yaml"
#: the main job's equal-compute control (the baseline fine-tuned in fp32 with the QAT schedule),
#: trained by run_tiny into ``<exp_dir>/asr_<name>``
CONTROL = next(s for s in DEFAULT_SYSTEMS if s.name == "fp32_finetune")
DECODE_CONFIG = CONF_DIR / "decode_asr.yaml"
#: Environment variables that choose what a stock program runs; never inherited by training.
#: Sections a derived tiny config may change; everything else must equal the baseline's.
MAY_DIFFER = {"encoder", "encoder_conf", "model", "model_conf"}
TIME_FILE = "benchmark_train_time.json"


# ---------------------------------------------------------------------------------------- shared
def add_common_args(p: argparse.ArgumentParser, default_exp: str = "exp/tiny") -> None:
    """Options every training benchmark takes."""
    p.add_argument("--exp_dir", type=Path, default=Path(default_exp),
                   help="main-job output dir: data/, token_list/, asr_stats/ are reused if present, "
                        "else made here (default: %(default)s)")
    p.add_argument("--max_epoch", type=int, default=None,
                   help="epochs for EVERY training (passed as asr_train --max_epoch); default: the configs' own")
    p.add_argument("--train_arg", action="append", default=[], dest="train_args",
                   help="extra asr_train argument, repeatable (e.g. --train_arg=--batch_bins --train_arg=500000)")
    p.add_argument("--data_dir", type=Path, default=None,
                   help="your own corpus (train/, dev/, test/ Kaldi data dirs) instead of the synthetic one; "
                        "default: the corpus --exp_dir was made from")
    p.add_argument("--num_train", type=int, default=2000, help="corpus size if the corpus must be made")
    p.add_argument("--num_dev", type=int, default=150)
    p.add_argument("--num_test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="corpus seed if the corpus must be made")
    p.add_argument("--nj", type=int, default=2, help="corpus/decoding jobs")


def clean_environment() -> None:
    """Trainings must not see a decode-time system/plan choice."""
    for var in DECODE_ONLY:
        if os.environ.pop(var, None) is not None:
            log.warning("ignoring %s from the environment (the benchmark sets it per decode)", var)


def begin(args: argparse.Namespace) -> List[str]:
    """Start a training benchmark: log to the console, clear the decode-only variables, and return
    the extra ``asr_train`` arguments every training of the run gets (``--train_arg``, ``--max_epoch``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    clean_environment()
    return list(args.train_args) + ([] if args.max_epoch is None else ["--max_epoch", str(args.max_epoch)])


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the body (stock programs inherit ``os.environ``)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare_corpus(args: argparse.Namespace) -> AsrExperiment:
    """Data, word token list and feature stats (reused when present); returns a template
    experiment (baseline config) that the benchmarks copy with ``dataclasses.replace``.

    The corpus is the user's ``--data_dir`` (validated, audio at the baseline config's rate, before
    anything is written), else the one ``--exp_dir`` was made from, else the synthetic corpus."""
    exp_dir = args.exp_dir.resolve()
    try:
        corpus = resolve_corpus(exp_dir, args.data_dir, [BASELINE_CONFIG])
    except ValueError as err:  # DataDirError too
        raise SystemExit(f"benchmark: {err}") from None
    data = corpus.path if corpus is not None else exp_dir / SYNTHETIC_DATA
    template = AsrExperiment(
        data_dir=data, train_set="train", valid_set="dev", test_sets=["test"],
        token_list=exp_dir / "token_list" / "word" / "tokens.txt", stats_dir=exp_dir / "asr_stats",
        exp_dir=exp_dir / "asr_conformer", train_config=BASELINE_CONFIG, inference_config=DECODE_CONFIG,
        decode_nj=args.nj,
    )
    with exclusive(exp_dir / ".prepare.lock"):
        if corpus is not None:
            log.info("using the corpus in %s (%s)", data, corpus.counts)
        elif all((data / s / "text").is_file() for s in ("train", "dev", "test")):
            counts = {s: sum(1 for _ in open(data / s / "text")) for s in ("train", "dev", "test")}
            log.info("reusing the corpus in %s (%s)", data, counts)
        else:
            from espnet_compress.corpus.spoken_commands import generate_corpus

            log.info("making the corpus in %s (%d/%d/%d utterances)", data, args.num_train, args.num_dev, args.num_test)
            generate_corpus(data, seed=args.seed, num_train=args.num_train, num_dev=args.num_dev,
                            num_test=args.num_test, nj=args.nj, progress=True)
        make_token_list(data / "train" / "text", template.token_list)
        collect_stats(template)
        _check_stats_dim(template.stats_dir / "train" / "feats_stats.npz", BASELINE_CONFIG)
    return template


def _check_stats_dim(stats: Path, config: Path) -> None:
    """Feature statistics made with another frontend (e.g. before the baseline's mel bins changed)
    would break global_mvn in every training; fail early with the reason."""
    import numpy as np

    dim = int((yaml.safe_load(config.read_text()).get("frontend_conf") or {}).get("n_mels", 80))
    have = int(np.load(stats)["sum"].shape[-1])
    if have != dim:
        raise SystemExit(f"{stats} holds {have}-dim feature statistics but {config.name} makes {dim}-dim "
                         f"features (frontend_conf.n_mels); use a fresh --exp_dir or remove {stats.parent.parent}")


def check_mirrors_baseline(config: Path, baseline: Path = BASELINE_CONFIG) -> List[str]:
    """Settings outside the encoder/model sections in which ``config`` differs from the baseline
    (the twins must train exactly like the baseline); returned so reports can flag them."""
    a, b = (yaml.safe_load(Path(p).read_text()) for p in (config, baseline))
    keys = sorted((set(a) | set(b)) - MAY_DIFFER)
    return [k for k in keys if a.get(k) != b.get(k)]


@dataclasses.dataclass
class TrainRecord:
    name: str
    exp_dir: Path
    seconds: Optional[float]  # wall time
    source: str  # how the time was obtained
    trained_now: bool
    cpu_seconds: Optional[float] = None  # user+sys CPU time of asr_train and its workers

    def time_text(self) -> str:
        """CPU time when it was measured, else the wall time and its source: a reused training
        (e.g. the main job's baseline) has no CPU record, and "0 s" would misreport it."""
        if self.cpu_seconds is not None:
            return f"{self.cpu_seconds:.0f} s CPU"
        return f"{fmt_seconds(self.seconds)} s wall ({self.source})"


def _configured_epochs(config: Path) -> int:
    return int(yaml.safe_load(Path(config).read_text()).get("max_epoch", 0))


def epochs_or_zero(value: str) -> int:
    """argparse type of ``--long_control_epochs``: refused at parse time, before anything trains."""
    epochs = int(value)
    if epochs < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 epochs (0: no such control), got {epochs}")
    return epochs


def long_control(template: AsrExperiment, exp_dir: Path, baseline: AsrExperiment, epochs: int,
                 train_args: List[str]) -> AsrExperiment:
    """The main job's control trained as long as a compressed system that had ``epochs`` more epochs
    after the baseline (the baseline fine-tuned with the control's schedule), trained if missing.
    One per main-job dir and length, so every benchmark comparing against it shares the training."""
    exp = dataclasses.replace(
        template, exp_dir=exp_dir / "benchmarks" / f"asr_{CONTROL.name}_{epochs}ep", train_config=CONTROL.config,
        train_args=[*train_args, "--max_epoch", str(epochs),
                    "--init_param", str(baseline.exp_dir / baseline.inference_model)])
    timed_train("long_control", exp, epochs)
    return exp


def timed_train(name: str, exp: AsrExperiment, max_epoch: Optional[int]) -> TrainRecord:
    """``exp.train()`` (stock asr_train), timed by our own wall clock and recorded next to the
    model; a training already on disk is reused after checking it ran the requested epochs."""
    want = max_epoch if max_epoch is not None else _configured_epochs(exp.train_config)
    done_conf = exp.exp_dir / "config.yaml"
    if exp.is_trained() and done_conf.exists():
        have = yaml.safe_load(done_conf.read_text()).get("max_epoch")
        if have != want:
            raise SystemExit(f"{exp.exp_dir} was trained for {have} epochs, this run asks for {want}; "
                             f"use another --exp_dir or remove that directory")
    resumed = (exp.exp_dir / "checkpoint.pth").exists() and not exp.is_trained()
    start, cpu_start = time.perf_counter(), _children_cpu()
    trained = exp.train()
    if trained:
        seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
        record = {"seconds": seconds, "cpu_seconds": cpu, "max_epoch": want, "resumed": resumed,
                  "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        atomic_write_text(exp.exp_dir / TIME_FILE, json.dumps(record, indent=2) + "\n")
        return TrainRecord(name, exp.exp_dir, seconds, "timer (resumed: partial)" if resumed else "timer", True, cpu)
    seconds, source, cpu = read_train_seconds(exp.exp_dir)
    return TrainRecord(name, exp.exp_dir, seconds, source, False, cpu)


def _children_cpu() -> float:
    """User+sys CPU seconds of finished child processes (and the children they waited for). On a
    shared machine this is the reproducible cost; wall time also counts waiting for the CPU."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


_LOG_TIME = re.compile(r"^\[[^\]]*\] (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ")


def read_train_seconds(exp_dir: Path) -> tuple:
    """(wall seconds, source, CPU seconds) of a finished training: our own record, else the first
    and last timestamps of train.log (CPU time unknown)."""
    rec = exp_dir / TIME_FILE
    if rec.exists():
        info = json.loads(rec.read_text())
        return info["seconds"], "timer (resumed: partial)" if info.get("resumed") else "timer", info.get("cpu_seconds")
    stamps = []
    log_file = exp_dir / "train.log"
    if log_file.exists():
        for line in log_file.read_text(errors="replace").splitlines():
            m = _LOG_TIME.match(line)
            if m:
                stamps.append(datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
    if len(stamps) >= 2:
        return (stamps[-1] - stamps[0]).total_seconds(), "train.log timestamps", None
    return None, "unknown", None


@dataclasses.dataclass
class TaggedDecode(AsrExperiment):
    """An experiment decoded under a given environment (system/plan) into its own directory.

    ``train_config_override`` decodes the checkpoint with another model config (e.g. a stock
    Conformer's checkpoint built as ``elastic_conformer`` so that a plan can skip blocks): it is
    passed as a second ``--asr_train_config``, which asr_inference's argparse takes over the first.
    """

    tag: str = ""
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    train_config_override: Optional[Path] = None
    decode_root: Optional[Path] = None  # default: the training dir (like asr.sh)

    def decode_dir(self) -> Path:
        base = super().decode_dir()
        name = f"{base.name}_{self.tag}" if self.tag else base.name
        return (self.decode_root or base.parent) / name

    def decode(self, extra_args: Sequence[str] = ()) -> bool:
        extra = list(extra_args)
        if self.train_config_override is not None:
            extra += ["--asr_train_config", str(self.train_config_override)]
        with environment(dict(self.env)):
            return super().decode(extra)


def tagged(exp: AsrExperiment, tag: str = "", env: Optional[Mapping[str, str]] = None,
           train_config_override: Optional[Path] = None, decode_root: Optional[Path] = None) -> TaggedDecode:
    fields = {f.name: getattr(exp, f.name) for f in dataclasses.fields(AsrExperiment)}
    return TaggedDecode(**fields, tag=tag, env=dict(env or {}), train_config_override=train_config_override,
                        decode_root=decode_root)


def build_params(config: Path, model_file: Optional[Path] = None) -> int:
    """Parameters of the model a training config builds (shared blocks counted once)."""
    from espnet2.tasks.asr import ASRTask

    from espnet_compress.utils.params import count_parameters

    model, _ = ASRTask.build_model_from_file(config, model_file, "cpu")
    return count_parameters(model)


def save_report(out: Path, stem: str, lines: Sequence[str], data: Any) -> None:
    """Write ``<out>/<stem>.md`` (the table lines) and ``<stem>.json`` atomically, and print the table."""
    atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    atomic_write_text(out / f"{stem}.json", json.dumps(data, indent=2) + "\n")
    print("\n".join(lines))


def fmt_seconds(s: Optional[float]) -> str:
    return "n/a" if s is None else f"{s:.0f}"


def plot_setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    """Label, grid, legend and write a benchmark figure (the finishing steps every plot shares)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- this benchmark
NESTED_CONFIG = CONF_DIR / "train_asr_nested_conformer_tiny.yaml"
#: nested system -> (twin name, twin training config)
TWINS: Dict[str, tuple] = {
    "full": ("conformer", BASELINE_CONFIG),
    "depth3": ("conformer_depth3", CONF_DIR / "train_asr_conformer_tiny_depth3.yaml"),
    "ffn192": ("conformer_ffn192", CONF_DIR / "train_asr_conformer_tiny_ffn192.yaml"),
    "int4": ("qat_4bit_scratch", CONF_DIR / "train_asr_quantized_conformer_tiny_4bit_scratch.yaml"),
    "half_int8": ("qat_half_8bit_scratch", CONF_DIR / "train_asr_quantized_conformer_tiny_half_8bit_scratch.yaml"),
}


@dataclasses.dataclass
class Row:
    system: str
    spec: Dict[str, Any]
    nested_params: int
    nested_bytes: int
    nested_file: str
    nested_stock: bool
    nested_wer: float
    twin: str
    twin_params: int
    twin_bytes: int
    twin_file: str
    twin_wer: float
    verdict: str
    p_value: Optional[float]
    twin_train_seconds: Optional[float]
    twin_train_cpu_seconds: Optional[float]


def find_baseline(exp_dir: Path, max_epoch: Optional[int], model_name: str = "valid.acc.best.pth",
                  all_epochs: bool = False) -> Optional[Path]:
    """A finished fp32 baseline training (train_asr_conformer_tiny.yaml) with the requested epochs:
    the main job's, or the one a benchmark trained (nested_supernet and foldable share it).
    ``all_epochs``: only one that ran every epoch (a benchmark that turns early stopping off must not
    reuse a baseline the stopping rule ended sooner)."""
    want = max_epoch if max_epoch is not None else _configured_epochs(BASELINE_CONFIG)
    for cand in (exp_dir / "asr_conformer", exp_dir / "benchmarks" / "nested_supernet" / "asr_conformer",
                 exp_dir / "benchmarks" / "foldable" / "asr_baseline4"):
        conf = cand / "config.yaml"
        if not training_finished(cand, model_name) or yaml.safe_load(conf.read_text()).get("max_epoch") != want:
            continue
        if all_epochs and training_summary(cand).epochs != want:
            log.info("not reusing %s: it stopped early, this run trains every epoch", cand)
            continue
        return cand
    return None


def _twin_experiment(template: AsrExperiment, bench: Path, main_exp: Path, twin: str, config: Path,
                     train_args: List[str], max_epoch: Optional[int], own_baseline: bool = False) -> AsrExperiment:
    """The twin's training dir; an fp32 baseline already trained with the same epochs is reused
    unless ``own_baseline`` (then it trains here, timed like every other twin)."""
    exp = dataclasses.replace(template, exp_dir=bench / f"asr_{twin}", train_config=config, train_args=train_args)
    if twin == "conformer" and not own_baseline:
        found = find_baseline(main_exp, max_epoch, exp.inference_model)
        if found is not None:
            log.info("reusing the fp32 baseline %s as the 'full' twin", found)
            exp = dataclasses.replace(exp, exp_dir=found)
    return exp


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--config", type=Path, default=NESTED_CONFIG, help="all-in-one training config")
    p.add_argument("--own_baseline", action="store_true",
                   help="train the fp32 twin of 'full' in the benchmark dir under the same conditions as the other "
                        "twins (its CPU time is then measured) instead of reusing the main job's baseline")
    p.add_argument("--tag", default="", help="names this all-in-one variant (its training dir and report files), "
                                             "e.g. 'random1' for a sampled config; the twins are shared")
    p.add_argument("--control_epochs", type=epochs_or_zero, default=0,
                   help="also train the fp32 baseline config from scratch under the same stopping rule with its "
                        "cap raised to this many epochs (the equal-compute control of 'full'; 0: none)")
    args = p.parse_args(argv)
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_-]+", args.tag):
        p.error(f"--tag must be letters, digits, '_' or '-', got {args.tag!r}")
    train_args = begin(args)
    exp_dir = args.exp_dir.resolve()
    bench = exp_dir / "benchmarks" / "nested_supernet"
    out = exp_dir / "benchmarks"
    suffix = f"_{args.tag}" if args.tag else ""

    systems = list(yaml.safe_load(args.config.read_text())["model_conf"]["systems"])
    missing = [s for s in systems if s not in TWINS]
    if missing:
        raise SystemExit(f"{args.config}: no twin config known for system(s) {missing}; known: {list(TWINS)}")
    if systems[0] != "full":
        raise SystemExit(f"{args.config}: model_conf.systems must list 'full' first (the fp32 largest system, "
                         f"compared with the baseline), got {systems}")
    drift = {c.name: check_mirrors_baseline(c) for c in [args.config, *(TWINS[s][1] for s in systems)]}
    drift = {k: v for k, v in drift.items() if v}
    if drift:
        log.warning("configs differ from %s outside encoder/model: %s", BASELINE_CONFIG.name, drift)

    template = prepare_corpus(args)
    nested = dataclasses.replace(template, exp_dir=bench / f"asr_nested{suffix}", train_config=args.config.resolve(),
                                 train_args=train_args)
    # only the config's systems get twins: a config with two systems trains one twin, not four
    twins = {}
    for sys_name in systems:
        twin, cfg = TWINS[sys_name]
        twins[sys_name] = (twin, _twin_experiment(template, bench, exp_dir, twin, cfg, train_args, args.max_epoch,
                                                  args.own_baseline))

    control, control_name = None, f"conformer_{args.control_epochs}ep"
    if args.control_epochs:
        control = dataclasses.replace(
            template, exp_dir=bench / f"asr_{control_name}", train_config=BASELINE_CONFIG,
            train_args=[*train_args, "--max_epoch", str(args.control_epochs)])

    # ---- training: the one pass, then each twin separately (same epochs), then the control
    records: Dict[str, TrainRecord] = {}
    jobs = [("all-in-one", nested)] + [(twin, exp) for twin, exp in twins.values()]
    for name, exp in tqdm(jobs, desc="train", unit="model"):
        if name == "conformer":
            # Looked up again now: foldable.py running alongside may have finished the shared
            # baseline while the all-in-one model trained.
            sys_name = next(s for s, (twin, _) in twins.items() if twin == name)
            exp = _twin_experiment(template, bench, exp_dir, name, TWINS[sys_name][1], train_args, args.max_epoch,
                                   args.own_baseline)
            twins[sys_name] = (name, exp)
        records[name] = timed_train(name, exp, args.max_epoch)
    if control is not None:
        records["control"] = timed_train("control", control, args.control_epochs)

    # ---- decoding: every nested system from the one checkpoint, each twin
    decodes = {s: tagged(nested, f"sys_{s}", {"ESPNET_COMPRESS_SYSTEM": s}) for s in systems}
    for s, dec in tqdm(decodes.items(), desc="decode nested", unit="system"):
        dec.decode()
    for twin, exp in tqdm(twins.values(), desc="decode twins", unit="model"):
        exp.decode()
    if control is not None:
        control.decode()

    # ---- export every system on its own; the 4-bit twin packed (what it would deploy)
    from espnet_compress.export.packed_export import PACKED_NAME, export_packed
    from espnet_compress.export.system_export import export_system

    exports = {}
    for s in tqdm(systems, desc="export", unit="system"):
        sys_dir = nested.exp_dir / "systems" / s
        done = sys_dir / "export.json"
        if done.exists():
            exports[s] = json.loads(done.read_text())
            continue
        res = export_system(nested.exp_dir / "config.yaml", nested.exp_dir / nested.inference_model, s, sys_dir)
        exports[s] = {"model_file": str(res.model_file), "bytes": res.model_file.stat().st_size,
                      "params": res.num_params, "stock": res.stock, "packed": res.packed}
        atomic_write_text(done, json.dumps(exports[s], indent=2) + "\n")
    twin_files = {}
    for s, (twin, exp) in twins.items():
        model_file = exp.exp_dir / exp.inference_model
        if yaml.safe_load((exp.exp_dir / "config.yaml").read_text()).get("model") == "compressed":
            packed_dir = exp.exp_dir / "packed"
            if not (packed_dir / PACKED_NAME).exists():
                export_packed(exp.exp_dir / "config.yaml", model_file, packed_dir)
            model_file = packed_dir / PACKED_NAME
        twin_files[s] = model_file

    # ---- scoring: each nested system vs its twin (MAPSSWE), and all vs the fp32 baseline
    from espnet_compress.scoring.compare import SystemSpec, compare, verdict_text

    twin_params = {s: build_params(exp.exp_dir / "config.yaml") for s, (_, exp) in twins.items()}
    rows: List[Row] = []
    score_dir = bench / f"compare{suffix}"
    for s in systems:
        twin, exp = twins[s]
        specs = [SystemSpec(twin, exp.decode_dir(), twin_files[s], twin_params[s]),
                 SystemSpec(f"nested_{s}", decodes[s].decode_dir(), Path(exports[s]["model_file"]),
                            exports[s]["params"])]
        table = compare(specs, twin, template.data_dir, ["test"], score_dir / f"{s}_vs_{twin}")
        base_row, row = table.rows
        sig = row.significance["test"]
        rows.append(Row(
            system=s, spec=_spec(nested.exp_dir / "config.yaml", s), nested_params=exports[s]["params"],
            nested_bytes=exports[s]["bytes"], nested_file=exports[s]["model_file"], nested_stock=exports[s]["stock"],
            nested_wer=row.wer["test"].wer, twin=twin, twin_params=twin_params[s], twin_bytes=twin_files[s].stat().st_size,
            twin_file=str(twin_files[s]), twin_wer=base_row.wer["test"].wer, verdict=verdict_text(sig),
            p_value=None if sig is None else sig.p_value, twin_train_seconds=records[twin].seconds,
            twin_train_cpu_seconds=records[twin].cpu_seconds,
        ))
    all_specs = [SystemSpec("conformer", twins["full"][1].decode_dir(), twin_files["full"], twin_params["full"])]
    all_specs += [SystemSpec(f"nested_{s}", decodes[s].decode_dir(), Path(exports[s]["model_file"]), exports[s]["params"])
                  for s in systems]
    all_specs += [SystemSpec(twins[s][0], twins[s][1].decode_dir(), twin_files[s], twin_params[s])
                  for s in systems if s != "full"]
    control_report = None
    if control is not None:
        control_spec = SystemSpec(control_name, control.decode_dir(), control.exp_dir / control.inference_model,
                                  build_params(control.exp_dir / "config.yaml"))
        all_specs.append(control_spec)
        full = next(sp for sp in all_specs if sp.name == f"nested_{systems[0]}")
        table = compare([control_spec, full], control_name, template.data_dir, ["test"],
                        score_dir / f"full_vs_{control_name}")
        control_report = _control_report(control_name, table, twins["full"][1], control, nested, records, out, suffix)
    vs_baseline = compare(all_specs, "conformer", template.data_dir, ["test"], score_dir / "all_vs_fp32")

    # ---- storage and training cost
    largest = rows[0]  # the first listed system is the largest
    all_in_one = nested.exp_dir / nested.inference_model
    storage = {
        "all_in_one_bytes": all_in_one.stat().st_size,
        "exported_sum_bytes": sum(r.nested_bytes for r in rows),
        "twins_sum_bytes": sum(r.twin_bytes for r in rows),
        "largest_system_bytes": largest.nested_bytes,
        "num_systems": len(rows),
    }
    storage["all_in_one_vs_largest"] = storage["all_in_one_bytes"] / storage["largest_system_bytes"]
    storage["exported_sum_vs_largest"] = storage["exported_sum_bytes"] / storage["largest_system_bytes"]
    storage["twins_sum_vs_largest"] = storage["twins_sum_bytes"] / storage["largest_system_bytes"]
    storage["twins_sum_vs_all_in_one"] = storage["twins_sum_bytes"] / storage["all_in_one_bytes"]
    one = records["all-in-one"].seconds
    separate = [records[r.twin].seconds for r in rows]
    cost = {
        "one_pass_seconds": one,
        "separate_seconds": dict(zip([r.twin for r in rows], separate)),
        "separate_sum_seconds": None if None in separate else sum(separate),
        "time_sources": {k: v.source for k, v in records.items()},
    }
    cost["speedup_separate_over_one_pass"] = (
        None if one is None or cost["separate_sum_seconds"] is None else cost["separate_sum_seconds"] / one)
    one_cpu = records["all-in-one"].cpu_seconds
    separate_cpu = [records[r.twin].cpu_seconds for r in rows]
    cost["one_pass_cpu_seconds"] = one_cpu
    cost["separate_sum_cpu_seconds"] = None if None in separate_cpu else sum(separate_cpu)
    cost["cpu_speedup_separate_over_one_pass"] = (
        None if one_cpu is None or cost["separate_sum_cpu_seconds"] is None else cost["separate_sum_cpu_seconds"] / one_cpu)

    text = _markdown(rows, storage, cost, vs_baseline.to_markdown(), args, drift, control_report)
    print(text)
    atomic_write_text(out / f"nested_supernet{suffix}.md", text)
    atomic_write_text(out / f"nested_supernet{suffix}.json", json.dumps({
        "config": str(args.config), "max_epoch": args.max_epoch, "rows": [dataclasses.asdict(r) for r in rows],
        "storage": storage, "training": cost, "vs_fp32_baseline": vs_baseline.to_dict(),
        "config_drift": drift, "equal_compute_control": control_report,
    }, indent=2, default=str) + "\n")
    _plot(rows, storage, out / f"nested_supernet{suffix}_wer_vs_bytes.png")
    return 0


def _spec(config: Path, system: str) -> Dict[str, Any]:
    return (yaml.safe_load(config.read_text())["model_conf"]["systems"][system]) or {}


def _control_report(name: str, table: Any, baseline: AsrExperiment, control: AsrExperiment,
                    nested: AsrExperiment, records: Mapping[str, TrainRecord], out: Path, suffix: str) -> Dict[str, Any]:
    """Nested ``full`` against the equal-compute control, with what each of the three trained for
    (epochs run under the rule, updates, wall / CPU time) and their dev-accuracy curves plotted."""
    from espnet_compress.scoring.compare import verdict_text

    control_row, full_row = table.rows
    sig = full_row.significance["test"]
    runs = {"conformer": (baseline, records["conformer"]), name: (control, records["control"]),
            "all-in-one": (nested, records["all-in-one"])}
    summaries = {label: training_summary(exp.exp_dir) for label, (exp, _) in runs.items()}
    trained = {label: {"epochs": summary.epochs, "kept_epoch": summary.kept_epoch, "updates": summary.updates,
                       "wall_seconds": runs[label][1].seconds, "cpu_seconds": runs[label][1].cpu_seconds}
               for label, summary in summaries.items()}
    base_rule, control_rule = summaries["conformer"].rule, summaries[name].rule
    plot = plot_curves({f"conformer (cap {base_rule.max_epoch})": read_curve(baseline.exp_dir),
                        f"conformer (cap {control_rule.max_epoch}, equal compute)": read_curve(control.exp_dir),
                        "all-in-one (largest system)": read_curve(nested.exp_dir)},
                       out / f"nested_supernet{suffix}_dev_acc.png", control_rule)
    return {"control": name, "control_wer": control_row.wer["test"].wer, "full_wer": full_row.wer["test"].wer,
            "verdict": verdict_text(sig), "p_value": None if sig is None else sig.p_value, "trained": trained,
            "plot": str(plot)}


def _markdown(rows: Sequence[Row], storage: Dict, cost: Dict, vs_baseline: str, args, drift,
              control: Optional[Dict[str, Any]] = None) -> str:
    model_conf = yaml.safe_load(args.config.read_text()).get("model_conf", {})
    sampling = model_conf.get("sampling", "all")
    if sampling != "all":
        sampling += f" ({model_conf.get('num_random_systems', 1)} random system(s) per step besides the largest)"
    lines = [
        "## Nested systems of one all-in-one model vs individually trained twins",
        "",
        f"All-in-one config `{args.config.name}`: sampling {sampling}, share_computation "
        f"{model_conf.get('share_computation', True)}, kl_weight {model_conf.get('kl_weight', 0.1)} on "
        f"{model_conf.get('kl_target', 'decoder')}.",
        "",
        "| system | spec | nested params | nested bytes | nested WER % | twin | twin bytes | twin WER % | "
        "MAPSSWE nested vs twin | twin train s (wall / CPU) |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        spec = json.dumps(r.spec, separators=(",", ":")) if r.spec else "{}"
        lines.append(
            f"| {r.system} | `{spec}` | {r.nested_params:,} | {r.nested_bytes:,} | {r.nested_wer:.2f} | {r.twin} | "
            f"{r.twin_bytes:,} | {r.twin_wer:.2f} | {r.verdict} | {fmt_seconds(r.twin_train_seconds)} / {fmt_seconds(r.twin_train_cpu_seconds)} |")
    s, c = storage, cost
    speed, cpu_speed = c["speedup_separate_over_one_pass"], c["cpu_speedup_separate_over_one_pass"]
    lines += [
        "",
        f"Storage: one all-in-one checkpoint {s['all_in_one_bytes']:,} B = {s['all_in_one_vs_largest']:.2f}x the "
        f"largest system's export ({s['largest_system_bytes']:,} B); the {s['num_systems']} systems exported "
        f"separately {s['exported_sum_bytes']:,} B = {s['exported_sum_vs_largest']:.2f}x; the {s['num_systems']} "
        f"individually trained twins {s['twins_sum_bytes']:,} B = {s['twins_sum_vs_largest']:.2f}x "
        f"({s['twins_sum_vs_all_in_one']:.2f}x the all-in-one file).",
        "",
        f"Training cost, one run each on a shared 2-core machine: wall time all-in-one {fmt_seconds(c['one_pass_seconds'])} s "
        f"vs separate twins {fmt_seconds(c['separate_sum_seconds'])} s in total, sum(separate) / one-pass = "
        f"{'n/a' if speed is None else f'{speed:.2f}x'}; CPU time (user+sys of asr_train, robust to other load) "
        f"{fmt_seconds(c['one_pass_cpu_seconds'])} s vs {fmt_seconds(c['separate_sum_cpu_seconds'])} s = "
        f"{'n/a' if cpu_speed is None else f'{cpu_speed:.2f}x'}. "
        f"Time sources: {', '.join(f'{k}: {v}' for k, v in c['time_sources'].items())}.",
        "",
        f"Epochs: {'configs default' if args.max_epoch is None else args.max_epoch} for every training. "
        "Nested systems are decoded from the one all-in-one checkpoint (stock asr_inference, "
        "ESPNET_COMPRESS_SYSTEM); nested bytes/params are those of `export_system`'s standalone file "
        "(stock .pth for fp32 systems, packed for quantized ones); a quantized twin's bytes are its packed export. "
        "MAPSSWE: two-sided, alpha 0.05, twin as the baseline; \"lossless\" = no significant difference.",
    ]
    if drift:
        lines += ["", f"WARNING: configs differ from the baseline outside encoder/model: {drift}"]
    if control is not None:
        lines += ["", f"### `full` against the equal-compute control `{control['control']}`", "",
                  "| model | trained for (under the stopping rule) | train s (wall / CPU) | WER % |", "|---|---|---:|---:|"]
        wers = {"conformer": rows[0].twin_wer, control["control"]: control["control_wer"],
                "all-in-one": control["full_wer"]}
        for label, t in control["trained"].items():
            shown = "all-in-one, system `full`" if label == "all-in-one" else label
            lines.append(f"| {shown} | {t['epochs']} epochs (kept {t['kept_epoch']}), {t['updates']:,} updates | "
                         f"{fmt_seconds(t['wall_seconds'])} / {fmt_seconds(t['cpu_seconds'])} | {wers[label]:.2f} |")
        lines += ["", f"MAPSSWE nested `full` vs `{control['control']}`: {control['verdict']}. "
                      f"Dev-accuracy curves: `{Path(control['plot']).name}`."]
    lines += ["", "### Every system vs the fp32 baseline", "", vs_baseline]
    return "\n".join(lines) + "\n"


def _plot(rows: Sequence[Row], storage: Dict, path: Path) -> None:
    plt = plot_setup()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        ax.plot([r.nested_bytes / 1e6, r.twin_bytes / 1e6], [r.nested_wer, r.twin_wer], color="0.8", zorder=1)
        ax.scatter(r.nested_bytes / 1e6, r.nested_wer, color="C0", marker="o", zorder=2,
                   label="nested (one all-in-one model)" if r is rows[0] else None)
        ax.scatter(r.twin_bytes / 1e6, r.twin_wer, color="C1", marker="s", zorder=2,
                   label="trained on its own" if r is rows[0] else None)
        ax.annotate(r.system, (r.nested_bytes / 1e6, r.nested_wer), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(storage["all_in_one_bytes"] / 1e6, color="C0", ls=":", lw=1, label="all-in-one checkpoint")
    save_plot(fig, ax, path, "model size on disk (MB)", "WER (%)", "spoken_commands test: nested systems vs twins")


if __name__ == "__main__":
    sys.exit(main())
