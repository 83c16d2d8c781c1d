"""Pipelined Gumbel-softmax DARTS over FFN widths and low-rank bottlenecks (issue 13; the lossless-4bit
paper's Table 1 trends) on the tiny spoken_commands corpus.

What it runs, all through stock ``espnet2.bin.asr_train``/``asr_inference``:

* a held-out split of the training set (``espnet_compress.pipeline.search.split_held_out``):
  ``train_sub`` trains the supernets' weights, ``train_heldout`` the architecture weights;
* stage 1 per search object (``width``: FW/FW-m hidden widths; ``rank``: BN/BN-m bottlenecks of
  SLLS-factorised FFNs; ``both``), ``conf/spoken_commands/train_asr_searchable_conformer_tiny*_stage1.yaml``;
* stage 2 variants from those supernets: Gumbel with an eta sweep (``--etas``, at least 3 values:
  eta controls the size), plain softmax (the paper's ablation), and ``rank``/``both`` at the etas of
  ``--object_etas``;
* with ``--stage1_from_baseline N``, stage 1 starts from the trained baseline instead of from scratch
  (``warm_start_search``: width prefixes; truncated-SVD factors for the bottlenecks) and trains N epochs;
* each searched architecture derived (``derive_search``, from the last stage-2 epoch), fine-tuned on
  the full training set from its inherited weights (``--init_param``), decoded, and compared with the
  fp32 baseline (``train_asr_conformer_tiny.yaml``, reused from the main job when it trained the
  same epochs): WER, MAPSSWE, parameters of the whole model, checkpoint bytes;
* the search cost: CPU time (user+sys of asr_train) of stage 1 and stage 2 next to one baseline
  training.

Usage::

    nice -n 19 .venv/bin/python benchmarks/darts_search.py --exp_dir exp/tiny
    # smoke test on a fresh, small corpus (proves the pipeline, not a result):
    nice -n 19 .venv/bin/python benchmarks/darts_search.py --exp_dir /tmp/darts_smoke \\
        --num_train 60 --num_dev 8 --num_test 12 --max_epoch 1 --stage2_epochs 1 --finetune_epochs 1

Restartable: finished trainings, derivations and decodes are reused. Outputs:
``<exp_dir>/benchmarks/darts_search/`` (split, trainings, derived models, scoring) and
``<exp_dir>/benchmarks/darts_search.{md,json}`` + ``darts_search_wer_vs_params.png`` (``darts_search_warm``
with ``--stage1_from_baseline``; ``--only`` appends the selected prefixes to the report's name).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nested_supernet import (  # noqa: E402
    CONF_DIR,
    CONTROL,
    TrainRecord,
    add_common_args,
    begin,
    epochs_or_zero,
    find_baseline,
    fmt_seconds,
    long_control as make_long_control,
    plot_setup,
    prepare_corpus,
    read_train_seconds,
    save_plot,
    timed_train,
)

from espnet_compress.export.search_export import RECORD, derive_search, warm_start_search  # noqa: E402
from espnet_compress.features.search import SearchConfigError, parse_eta  # noqa: E402
from espnet_compress.pipeline.convergence import training_summary  # noqa: E402
from espnet_compress.pipeline.search import split_held_out  # noqa: E402
from espnet_compress.pipeline.stages import AsrExperiment  # noqa: E402
from espnet_compress.utils.io import atomic_write_text  # noqa: E402

log = logging.getLogger("benchmark")

#: epochs of each derived model's fine-tuning unless --finetune_epochs says otherwise (the main job's QAT schedule)
FINETUNE_EPOCHS = 4

#: search object -> (stage-1 config, stage-2 config)
OBJECTS: Dict[str, tuple] = {
    "width": (CONF_DIR / "train_asr_searchable_conformer_tiny_stage1.yaml",
              CONF_DIR / "train_asr_searchable_conformer_tiny_stage2.yaml"),
    "rank": (CONF_DIR / "train_asr_searchable_conformer_tiny_rank_stage1.yaml",
             CONF_DIR / "train_asr_searchable_conformer_tiny_rank_stage2.yaml"),
    "both": (CONF_DIR / "train_asr_searchable_conformer_tiny_both_stage1.yaml",
             CONF_DIR / "train_asr_searchable_conformer_tiny_both_stage2.yaml"),
}
STAGE2_MODEL = "latest.pth"  # the last epoch: the best-accuracy one may precede the annealing


@dataclasses.dataclass(frozen=True)
class Variant:
    """One stage-2 search: object, method and penalty weight."""

    object: str
    method: str
    eta: float

    @property
    def name(self) -> str:
        return f"{self.object}_{self.method}_eta{self.eta:g}"

    def stage2_args(self, held_out: Path) -> List[str]:
        args = ["--encoder_conf", f"search.eta={self.eta}", "--encoder_conf", f"search.held_out={held_out}"]
        if self.method == "softmax":  # plain softmax has no temperature
            args += ["--encoder_conf", "search.method=softmax", "--encoder_conf", "search.temperature=null"]
        return args


def variants(args: argparse.Namespace) -> List[Variant]:
    out = [Variant("width", "gumbel", e) for e in args.etas]
    out.append(Variant("width", "softmax", args.softmax_eta))
    out += [Variant(obj, "gumbel", eta) for obj in ("rank", "both") for eta in args.object_etas]
    if args.only:
        out = [v for v in out if any(v.name.startswith(prefix) for prefix in args.only)]
    return out


@dataclasses.dataclass
class Result:
    variant: Variant
    architecture: Dict[str, Dict[str, list]]
    stock: bool
    params: Optional[int]
    bytes: int
    wer: float
    verdict: str
    p_value: Optional[float]
    stage1_cpu: Optional[float]
    stage2_cpu: Optional[float]
    finetune_cpu: Optional[float]
    vs_control: str
    vs_long: Optional[str]  # against the control trained as long (--long_control_epochs), if run


def _eta(value: str) -> float:
    """argparse type: the search's own rule for ``eta``, applied before anything trains (stage 2,
    where the search would refuse it, starts only after stage 1)."""
    try:
        return parse_eta(float(value))
    except (SearchConfigError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _link(target: Path, link: Path) -> None:
    if not link.exists():
        link.symlink_to(target.resolve(), target_is_directory=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--stage2_epochs", type=int, default=None, help="epochs of every stage-2 run (default: config's)")
    p.add_argument("--finetune_epochs", type=int, default=FINETUNE_EPOCHS,
                   help="epochs of each derived model's fine-tuning; another number than the default fine-tunes "
                        "(and scores, reports) into their own dirs, next to the default's")
    p.add_argument("--held_out_fraction", type=float, default=0.2, help="share of train held out for stage 2")
    p.add_argument("--etas", type=_eta, nargs="+", default=[0.0, 2.0, 8.0], help="Gumbel width-search eta sweep")
    p.add_argument("--softmax_eta", type=_eta, default=2.0, help="eta of the plain-softmax ablation")
    p.add_argument("--object_etas", type=_eta, nargs="+", default=[2.0],
                   help="etas of the rank-only and both searches")
    p.add_argument("--stage1_from_baseline", type=int, default=None, metavar="EPOCHS",
                   help="warm start: every supernet's stage 1 starts from the fp32 baseline's weights (width "
                        "prefixes, so the width supernet at its largest width IS the baseline; truncated-SVD "
                        "factors for the bottlenecks) and trains EPOCHS epochs, instead of training from scratch "
                        "to the baseline's stopping rule")
    p.add_argument("--long_control_epochs", type=epochs_or_zero, default=0,
                   help="also score every searched model against the baseline fine-tuned this many epochs with the "
                        "control's schedule (about as many updates as stage 1 + fine-tuning, or more); 0: not run")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only variants whose name starts with one of these (e.g. width_gumbel)")
    args = p.parse_args(argv)
    if args.finetune_epochs <= 0:
        p.error(f"--finetune_epochs must be a positive number of epochs, got {args.finetune_epochs}")
    common = list(args.train_args)
    stage1_args = begin(args)  # logging, clean environment; --max_epoch applies to stage 1 and the baseline
    exp_dir = args.exp_dir.resolve()
    kind = "darts_search" if args.stage1_from_baseline is None else "darts_search_warm"  # work dir of each kind
    bench = exp_dir / "benchmarks" / kind
    # a non-default fine-tune is a second measurement of the same searches, kept beside the first
    ft = "" if args.finetune_epochs == FINETUNE_EPOCHS else f"_ft{args.finetune_epochs}ep"
    report_name = kind + "".join(f"_{prefix}" for prefix in args.only or []) + ft
    chosen = variants(args)
    if not chosen:
        raise SystemExit(f"--only {args.only} selects no variant")
    if len([v for v in chosen if v.object == "width" and v.method == "gumbel"]) < 3 and not args.only:
        raise SystemExit("--etas needs at least 3 values to show eta controlling the size")

    if args.stage1_from_baseline is not None and args.stage1_from_baseline <= 0:
        raise SystemExit(f"--stage1_from_baseline must be a positive number of epochs, got {args.stage1_from_baseline}")

    template = prepare_corpus(args)
    split = split_held_out(template.data_dir / template.train_set, bench / "split", template.stats_dir,
                           fraction=args.held_out_fraction, seed=args.seed)
    for subset in (template.valid_set, *template.test_sets):
        _link(template.data_dir / subset, bench / "split" / subset)
    log.info("held-out split: %d utterances train the weights, %d the architecture", split.num_sub, split.num_held_out)

    # ---- baseline (reused when the main job or another benchmark trained it with these epochs)
    found = find_baseline(exp_dir, args.max_epoch, template.inference_model)
    baseline = dataclasses.replace(template, exp_dir=found or bench / "asr_conformer", train_args=stage1_args)
    records: Dict[str, TrainRecord] = {"baseline": timed_train("baseline", baseline, args.max_epoch)}

    # ---- stage 1 per object, stage 2 per variant
    stage1: Dict[str, AsrExperiment] = {}
    stage1_epochs = args.max_epoch if args.stage1_from_baseline is None else args.stage1_from_baseline
    for obj in sorted({v.object for v in chosen}, key=list(OBJECTS).index):
        warm_args: List[str] = []
        if args.stage1_from_baseline is not None:
            init = bench / "warm_start" / f"{obj}.pth"
            if not init.is_file():
                warm_start_search(baseline.exp_dir / "config.yaml", baseline.exp_dir / baseline.inference_model,
                                  OBJECTS[obj][0], init)
            warm_args = ["--max_epoch", str(stage1_epochs), "--init_param", str(init)]
        stage1[obj] = dataclasses.replace(
            template, data_dir=split.out_dir, train_set=split.train_sub, stats_dir=split.stats_dir(split.train_sub),
            exp_dir=bench / f"asr_{obj}_stage1", train_config=OBJECTS[obj][0],
            train_args=[*stage1_args, *warm_args])
    for obj, exp in tqdm(stage1.items(), desc="stage 1 (weights)", unit="supernet"):
        records[f"{obj}_stage1"] = timed_train(f"{obj}_stage1", exp, stage1_epochs)
    stage2_epochs = [] if args.stage2_epochs is None else ["--max_epoch", str(args.stage2_epochs)]
    stage2: Dict[str, AsrExperiment] = {}
    for v in chosen:
        init = stage1[v.object].exp_dir / stage1[v.object].inference_model
        stage2[v.name] = dataclasses.replace(
            template, data_dir=split.out_dir, train_set=split.held_out, stats_dir=split.stats_dir(split.held_out),
            exp_dir=bench / f"asr_{v.name}_stage2", train_config=OBJECTS[v.object][1],
            train_args=[*common, *stage2_epochs, "--init_param", str(init), *v.stage2_args(split.held_out_dir.resolve())])
    for name, exp in tqdm(stage2.items(), desc="stage 2 (architecture)", unit="search"):
        records[f"{name}_stage2"] = timed_train(f"{name}_stage2", exp, args.stage2_epochs)

    # ---- derive, fine-tune from the inherited weights, decode
    finetuned: Dict[str, AsrExperiment] = {}
    derived: Dict[str, Dict[str, Any]] = {}
    for v in tqdm(chosen, desc="derive + fine-tune", unit="model"):
        out = bench / "derived" / v.name
        if not (out / RECORD).is_file():
            src = stage2[v.name].exp_dir
            model_file = src / STAGE2_MODEL if (src / STAGE2_MODEL).exists() else src / stage2[v.name].inference_model
            derive_search(src / "config.yaml", model_file, out)
        derived[v.name] = json.loads((out / RECORD).read_text())
        finetuned[v.name] = dataclasses.replace(
            template, exp_dir=bench / f"asr_{v.name}_finetune{ft}", train_config=out / "config.yaml",
            train_args=[*common, "--max_epoch", str(args.finetune_epochs), "--init_param", str(out / "model.pth")])
        records[f"{v.name}_finetune"] = timed_train(f"{v.name}_finetune", finetuned[v.name], args.finetune_epochs)
    baseline.decode()
    for exp in tqdm(finetuned.values(), desc="decode", unit="model"):
        exp.decode()

    # ---- scoring against the fp32 baseline
    from espnet_compress.scoring.compare import SystemSpec, compare, verdict_text

    specs = [SystemSpec("baseline", baseline.decode_dir(), baseline.exp_dir / baseline.inference_model)]
    specs += [SystemSpec(name, exp.decode_dir(), exp.exp_dir / exp.inference_model) for name, exp in finetuned.items()]
    table = compare(specs, "baseline", template.data_dir, ["test"], bench / f"compare{ft}")
    base_row, rows = table.rows[0], table.rows[1:]
    # the main job's control (the baseline fine-tuned further), when it has one, and one trained as long
    def against(ctl: AsrExperiment, name: str) -> Tuple[Dict[str, str], str, str]:
        ctl.decode()
        cmp = compare([SystemSpec(name, ctl.decode_dir(), ctl.exp_dir / ctl.inference_model), *specs[1:]], name,
                      template.data_dir, ["test"], bench / f"compare_vs_{name}{ft}")
        return ({row.spec.name: verdict_text(row.significance["test"]) for row in cmp.rows[1:]},
                f"{cmp.rows[0].wer['test'].wer:.2f}%", str(training_summary(ctl.exp_dir).epochs))

    control = dataclasses.replace(template, exp_dir=exp_dir / f"asr_{CONTROL.name}")
    vs_control, control_wer, control_epochs = against(control, CONTROL.name) if control.is_trained() else (
        {}, "no control", "-")
    vs_long, long_wer = {}, None
    if args.long_control_epochs:
        vs_long, long_wer, _ = against(make_long_control(template, exp_dir, baseline, args.long_control_epochs, common),
                                       f"{CONTROL.name}_{args.long_control_epochs}ep")
    results = []
    for v, row in zip(chosen, rows):
        sig = row.significance["test"]
        results.append(Result(
            variant=v, architecture=derived[v.name]["architecture"], stock=derived[v.name]["stock"],
            params=row.num_params, bytes=row.checkpoint_bytes, wer=row.wer["test"].wer, verdict=verdict_text(sig),
            p_value=None if sig is None else sig.p_value, stage1_cpu=records[f"{v.object}_stage1"].cpu_seconds,
            stage2_cpu=records[f"{v.name}_stage2"].cpu_seconds, finetune_cpu=records[f"{v.name}_finetune"].cpu_seconds,
            vs_control=vs_control.get(v.name, "no control"), vs_long=vs_long.get(v.name)))
    base_record = records["baseline"]
    if base_record.cpu_seconds is None:  # a reused training: its CPU time if it recorded one
        base_record = dataclasses.replace(base_record, cpu_seconds=read_train_seconds(baseline.exp_dir)[2])
    base = {"params": base_row.num_params, "bytes": base_row.checkpoint_bytes, "wer": base_row.wer["test"].wer,
            "train_cpu": base_record.cpu_seconds, "train_seconds": base_record.seconds,
            "train_time": base_record.time_text(), "exp_dir": str(baseline.exp_dir), "control_wer": control_wer,
            "control_epochs": control_epochs, "long_control_wer": long_wer}
    report = _report(results, base, args, split, table.to_markdown())
    out_dir = exp_dir / "benchmarks"
    atomic_write_text(out_dir / f"{report_name}.md", report)
    atomic_write_text(out_dir / f"{report_name}.json", json.dumps({
        "baseline": base, "results": [dict(dataclasses.asdict(r), name=r.variant.name) for r in results],
        "epochs": {"baseline": args.max_epoch, "stage1": stage1_epochs, "stage1_from_baseline": args.stage1_from_baseline is not None,
                   "stage2": args.stage2_epochs, "finetune": args.finetune_epochs},
        "held_out": {"fraction": args.held_out_fraction, "train_sub": split.num_sub, "held_out": split.num_held_out},
    }, indent=2, default=str) + "\n")
    _plot(results, base, out_dir / f"{report_name}_wer_vs_params.png")
    print(report)
    return 0


def _compact(architecture: Dict[str, Dict[str, list]]) -> str:
    """``FW-m 96/128/.. FW ..; BN-m .. BN ..`` (per block, macaron FFN first, the paper's order)."""
    tags = {"feed_forward_macaron": "m", "feed_forward": ""}
    parts = []
    for kind, label in (("width", "FW"), ("rank", "BN")):
        for ffn, sizes in sorted(architecture.get(kind, {}).items(), key=lambda kv: kv[0] != "feed_forward_macaron"):
            parts.append(f"{label}{'-' + tags.get(ffn, ffn) if tags.get(ffn, ffn) else ''} {'/'.join(map(str, sizes))}")
    return "; ".join(parts)


def _stage1_text(args: argparse.Namespace) -> str:
    if args.stage1_from_baseline is not None:
        return (f"baseline {args.max_epoch or 'configs default'}; stage 1 warm-started from the trained baseline "
                f"(width prefixes: the width supernet at its largest width is the baseline; truncated-SVD "
                f"bottleneck factors) for {args.stage1_from_baseline} more")
    return f"stage 1 and the baseline {args.max_epoch or 'configs default'}"


def _report(results: Sequence[Result], base: Dict[str, Any], args: argparse.Namespace, split, scoring: str) -> str:
    long_head = f" vs control as long ({args.long_control_epochs} epochs) |" if args.long_control_epochs else ""
    long_base = f" control {base['long_control_wer']} |" if long_head else ""
    lines = [
        "## DARTS search over FFN widths and bottlenecks (benchmarks/darts_search.py)",
        "",
        f"Held-out split: {split.num_sub} utterances train the supernets' weights (stage 1), {split.num_held_out} "
        f"the architecture weights (stage 2); dev is the validation set of every run, test is only decoded. "
        f"Epochs: {_stage1_text(args)}, stage 2 "
        f"{args.stage2_epochs or 'configs default'}, fine-tuning of each derived model {args.finetune_epochs} "
        f"(full training set, from the inherited weights).",
        "",
        "| search | eta | architecture (per block; FW-m = macaron FFN) | parameters | x smaller | bytes | WER test | "
        f"MAPSSWE vs baseline | vs control |{long_head} CPU s stage 1 / stage 2 / fine-tune |",
        f"|---|---:|---|---:|---:|---:|---:|---|---|{'---|' if long_head else ''}---|",
        f"| fp32 baseline | | 4 x FFN 384 | {base['params']:,} | 1.00 | {base['bytes']:,} | {base['wer']:.2f}% | "
        f"baseline | control {base['control_wer']} |{long_base} training {base['train_time']} |",
    ]
    for r in results:
        ratio = base["params"] / r.params if r.params else float("nan")
        lines.append(
            f"| {r.variant.object} {r.variant.method} | {r.variant.eta:g} | {_compact(r.architecture)}"
            f"{' (stock conformer)' if r.stock else ''} | {r.params:,} | {ratio:.2f} | {r.bytes:,} | {r.wer:.2f}% | "
            f"{r.verdict} | {r.vs_control} |{f' {r.vs_long} |' if long_head else ''} "
            f"{fmt_seconds(r.stage1_cpu)} / {fmt_seconds(r.stage2_cpu)} / "
            f"{fmt_seconds(r.finetune_cpu)} |")
    for obj in OBJECTS:
        sweep = sorted((r for r in results if r.variant.object == obj and r.variant.method == "gumbel"),
                       key=lambda r: r.variant.eta)
        if len(sweep) >= 2:
            sizes = [r.params for r in sweep]
            monotone = all(a >= b for a, b in zip(sizes, sizes[1:]))
            lines += ["", f"eta sweep ({obj}, Gumbel): parameters {' -> '.join(f'{s:,}' for s in sizes)} for eta "
                          f"{', '.join(f'{r.variant.eta:g}' for r in sweep)}: "
                          f"{'monotonically non-increasing' if monotone else 'NOT monotonic'}."]
    uniform = [r.variant.name for r in results if all(len(set(v)) == 1 for kind in r.architecture.values()
                                                       for v in kind.values())]
    lines += ["", f"Searches whose answer is uniform across blocks: {uniform or 'none'}.",
              "", f"Control: the main job's fp32 baseline fine-tuned {base['control_epochs']} more epochs with the QAT "
                  f"schedule (asr_{CONTROL.name}); every searched model trained more than the baseline (stage 1 + "
                  f"fine-tuning).",
              "", "Search cost = stage 1 (shared by every search of the same object) + stage 2; CPU time is "
              "user+sys of asr_train (robust to other load on the machine).", "", "### Scoring", "", scoring]
    return "\n".join(lines) + "\n"


def _plot(results: Sequence[Result], base: Dict[str, Any], path: Path) -> None:
    plt = plot_setup()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = {"width": "o", "rank": "s", "both": "^"}
    seen = set()
    for r in results:
        color = "C0" if r.variant.method == "gumbel" else "C1"
        label = f"{r.variant.object} {r.variant.method}"
        ax.scatter(r.params / 1e6, r.wer, marker=markers[r.variant.object], color=color, zorder=2,
                   label=None if label in seen else label)
        seen.add(label)
        ax.annotate(f"eta {r.variant.eta:g}", (r.params / 1e6, r.wer), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.scatter(base["params"] / 1e6, base["wer"], marker="*", s=160, color="k", zorder=3, label="fp32 baseline")
    ax.axhline(base["wer"], color="k", ls=":", lw=1)
    save_plot(fig, ax, path, "parameters of the whole model (millions)", "WER test (%)",
              "spoken_commands: searched architectures, fine-tuned")


if __name__ == "__main__":
    sys.exit(main())
