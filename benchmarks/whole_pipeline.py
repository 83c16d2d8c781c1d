"""The lossless-4bit paper's whole pipeline on the tiny corpus: searched architecture -> KL-sensitivity
mixed precision -> QAT of encoder and decoder -> packed file, against the fp32 baseline.

Starts from a finished main job (``run_tiny``: the fp32 ``conformer`` and its equal-compute control
``fp32_finetune``) and a finished DARTS search (``benchmarks/darts_search.py``: the derived and
fine-tuned model of ``--variant`` in ``--search_run``), then:

1. measures Omega_i(n) of every Linear/Conv1d of the searched model on ``--num_utts`` dev
   utterances (:mod:`espnet_compress.mixed_precision`, cached) and takes the DP frontier's best
   allocation under ``--budget`` average bits;
2. writes the QAT config: the searched architecture (``search.fixed``), the allocated per-module
   bits, the layers the allocation does not measure (the Conv2d subsampling, the decoder's token
   embedding, the CTC projection) at ``--front_bits``, and the main job's 4-bit QAT schedule;
3. trains it from the searched model (stock ``asr_train --init_param``), packs it (``export_packed``)
   and decodes it with stock ``asr_inference`` (the packed file computes exactly what the QAT model
   computes: ``tests/test_search.py``);
4. scores baseline, control, searched fp32 model and the pipeline's model (sclite + MAPSSWE against
   the baseline and against the control), and reports bytes on disk and what each row trained for.

Target (issue "Lossless mixed precision"): the packed file >= 12x smaller than the fp32 baseline's
checkpoint with no significant WER increase.

Usage::

    nice -n 19 .venv/bin/python benchmarks/darts_search.py --exp_dir exp/tiny --only width --stage1_from_baseline 6
    nice -n 19 .venv/bin/python benchmarks/whole_pipeline.py --exp_dir exp/tiny

Restartable. Outputs, per setting ``<tag>`` (search run, variant, budget, front-end bits):
``<exp_dir>/benchmarks/whole_pipeline/<tag>/`` (config, training, packed file, scoring; the
sensitivities are cached beside it, shared by every budget) and
``<exp_dir>/benchmarks/whole_pipeline_<tag>.{md,json}`` + ``whole_pipeline_<tag>_wer_vs_bytes.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from nested_supernet import (  # noqa: E402
    CONTROL,
    add_common_args,
    begin,
    epochs_or_zero,
    find_baseline,
    long_control as make_long_control,
    plot_setup,
    prepare_corpus,
    read_train_seconds,
    save_plot,
    tagged,
    timed_train,
)

from espnet_compress.pipeline.convergence import training_summary  # noqa: E402
from espnet_compress.pipeline.stages import AsrExperiment  # noqa: E402
from espnet_compress.pipeline.tiny import CONF_DIR  # noqa: E402
from espnet_compress.utils.io import atomic_write_text  # noqa: E402

log = logging.getLogger("benchmark")
QAT_CONFIG = CONF_DIR / "train_asr_quantized_conformer_tiny_4bit.yaml"
#: the row of the control trained as long as the pipeline (``--long_control_epochs``)
LONG = f"{CONTROL.name}_long"
#: the architecture of a derived model comes from its config; the schedule from the QAT config
ARCHITECTURE_KEYS = ("encoder", "encoder_conf", "decoder", "decoder_conf")
#: darts_search.py's output dirs: stage 1 from scratch, or warm-started from the baseline
SEARCH_RUNS = ("darts_search", "darts_search_warm")


def qat_config(searched: Dict[str, Any], bits: Dict[str, int], front_bits: int) -> Dict[str, Any]:
    """The main job's QAT config with the searched architecture, the allocation's per-module bits,
    and the unmeasured front-end/embedding/CTC layers at ``front_bits`` (0: they stay fp32)."""
    from espnet_compress.mixed_precision.sensitivity import config_fragment

    base = yaml.safe_load(QAT_CONFIG.read_text())
    conf = dict(base, **{k: searched[k] for k in ARCHITECTURE_KEYS})
    fragment = config_fragment(bits, searched["encoder"])
    enc_bits = dict(fragment["encoder_conf"]["quant_conf"]["bits"])
    dec_bits = dict(fragment.get("model_conf", {}).get("decoder_quant", {}).get("bits", {}))
    enc_quant = dict(base["encoder_conf"]["quant_conf"], bits=enc_bits)
    dec_quant = dict(base["model_conf"]["decoder_quant"], bits=dec_bits)
    if front_bits:
        enc_bits["embed.conv.*"] = front_bits
        dec_bits.update({"embed.*": front_bits, "ctc_lo": front_bits})
        enc_quant["conv2d"] = True
        dec_quant.update(embedding=True, ctc=True)
    conf["model"] = fragment["model"]
    conf["encoder"] = fragment["encoder"]
    conf["encoder_conf"] = dict(conf["encoder_conf"], quant_conf=enc_quant)
    conf["model_conf"] = dict(base["model_conf"], decoder_quant=dec_quant)
    return conf


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--search_run", choices=SEARCH_RUNS, default="darts_search_warm",
                   help="which darts_search run: from scratch, or stage 1 warm-started from the baseline "
                        "(--stage1_from_baseline)")
    p.add_argument("--variant", default="width_gumbel_eta2",
                   help="the darts_search variant whose derived, fine-tuned model is the starting point")
    p.add_argument("--budget", type=float, default=3.0, help="average bits of the allocated layers")
    p.add_argument("--front_bits", type=int, default=4,
                   help="bits of the Conv2d subsampling, token embedding and CTC projection (0: fp32)")
    p.add_argument("--long_control_epochs", type=epochs_or_zero, default=0,
                   help="also train (and compare with) a control as long as the pipeline: the baseline fine-tuned "
                        "this many epochs with the control's schedule (0: only the main job's control)")
    p.add_argument("--num_utts", type=int, default=32,
                   help="dev utterances Omega is measured on (as mixed_precision.py)")
    args = p.parse_args(argv)
    train_args = begin(args)
    exp_dir = args.exp_dir.resolve()
    tag = f"{args.search_run}_{args.variant}_b{args.budget:g}_f{args.front_bits}"  # one work dir per setting
    bench = exp_dir / "benchmarks" / "whole_pipeline" / tag
    darts = exp_dir / "benchmarks" / args.search_run
    template = prepare_corpus(args)

    found = find_baseline(exp_dir, args.max_epoch, template.inference_model)
    if found is None:
        raise SystemExit(f"no finished fp32 baseline in {exp_dir}: run the main job (run_tiny) first")
    baseline = dataclasses.replace(template, exp_dir=found)
    control = dataclasses.replace(template, exp_dir=exp_dir / f"asr_{CONTROL.name}")
    searched = dataclasses.replace(template, exp_dir=darts / f"asr_{args.variant}_finetune")
    for name, exp in (("control", control), ("searched model", searched)):
        if not exp.is_trained():
            raise SystemExit(f"{name} {exp.exp_dir} is not trained: run the main job and "
                             f"benchmarks/darts_search.py --only {args.variant} "
                             f"{'--stage1_from_baseline N ' if args.search_run.endswith('warm') else ''}first")
    searched_model = searched.exp_dir / searched.inference_model
    from espnet_compress.quant.api import QuantConfig

    try:  # the width must suit the QAT config's quantizer too (e.g. max scaling has no 1-bit grid)
        QuantConfig.from_config(dict(yaml.safe_load(QAT_CONFIG.read_text())["encoder_conf"]["quant_conf"],
                                     bits=args.front_bits), "--front_bits")
    except ValueError as err:  # QuantConfigError, UnsupportedBitWidth
        raise SystemExit(f"whole_pipeline: {err}") from None
    long_control = None
    if args.long_control_epochs:
        long_control = make_long_control(template, exp_dir, baseline, args.long_control_epochs, train_args)

    # ---- 1. sensitivities and the allocation
    from espnet2.tasks.asr import ASRTask

    from espnet_compress.mixed_precision.allocation import AllocationError, Budget, Problem, solve
    from espnet_compress.mixed_precision.sensitivity import (DEFAULT_WIDTHS, held_out_batches, load_or_measure,
                                                             measured_layers)

    model, model_args = ASRTask.build_model_from_file(searched.exp_dir / "config.yaml", searched_model, "cpu")
    layers = measured_layers(model)
    try:  # an impossible budget fails before minutes of measuring
        Problem.shape_only({n: m.weight.numel() for n, m in layers.items()}, DEFAULT_WIDTHS).check_budget(
            Budget(args.budget))
    except AllocationError as err:
        raise SystemExit(f"whole_pipeline: --budget: {err}") from None
    batches, data_id = held_out_batches(template.data_dir / template.valid_set, model_args, args.num_utts)
    table = load_or_measure(bench.parent / f"{args.search_run}_{args.variant}_sensitivity.npz", model, batches,
                            data_id=data_id)  # shared by every budget
    problem = table.problem()
    alloc = solve(problem).best_under(Budget(args.budget))
    log.info("allocation: %.3f average bits over %d layers, sum of Omega %.4g", alloc.avg_bits,
             len(alloc.bits), alloc.omega)
    del model

    # ---- 2.-3. QAT config, training, packing, decoding
    conf = qat_config(yaml.safe_load((searched.exp_dir / "config.yaml").read_text()), alloc.bits, args.front_bits)
    conf_file = bench / "train_asr_pipeline_qat.yaml"
    atomic_write_text(conf_file, yaml.safe_dump(conf, sort_keys=False))
    qat = dataclasses.replace(template, exp_dir=bench / "asr_qat", train_config=conf_file,
                              train_args=[*train_args, "--init_param", str(searched_model)])
    timed_train("pipeline_qat", qat, args.max_epoch)
    from espnet_compress.export.packed_export import export_packed

    packed_dir = bench / "packed"
    if not (packed_dir / "export.done").exists():
        export_packed(qat.exp_dir / "config.yaml", qat.exp_dir / qat.inference_model, packed_dir)
        atomic_write_text(packed_dir / "export.done", "done\n")
    packed_file = packed_dir / "model.packed.pth"
    # the searched model decoded here, not in its training dir: darts_search.py may be decoding it there
    searched_dec = tagged(searched, decode_root=bench.parent / f"decode_{args.search_run}_{args.variant}")
    for exp in (baseline, control, searched_dec, qat) + ((long_control,) if long_control else ()):
        exp.decode()

    # ---- 4. scoring
    from espnet_compress.scoring.compare import SystemSpec, compare, verdict_text

    files = {"baseline": baseline.exp_dir / baseline.inference_model,
             CONTROL.name: control.exp_dir / control.inference_model,
             "searched": searched_model, "pipeline": packed_file}
    exps: Dict[str, AsrExperiment] = {"baseline": baseline, CONTROL.name: control, "searched": searched_dec,
                                      "pipeline": qat}
    if long_control is not None:
        exps[LONG] = long_control
        files[LONG] = long_control.exp_dir / long_control.inference_model
    # parameters: compare() counts them on the model the config beside each file builds
    specs = {n: SystemSpec(n, exps[n].decode_dir(), files[n]) for n in exps}
    vs_base = compare(list(specs.values()), "baseline", template.data_dir, ["test"], bench / "compare_vs_baseline")

    def verdicts(reference: str) -> Dict[str, Any]:
        """MAPSSWE of the searched and pipeline models against one control."""
        table = compare([specs[reference], specs["searched"], specs["pipeline"]], reference, template.data_dir,
                        ["test"], bench / f"compare_vs_{reference}")
        return {r.spec.name: r.significance.get("test") for r in table.rows[1:]}

    controls = {CONTROL.name: verdicts(CONTROL.name)}
    if long_control is not None:
        controls[LONG] = verdicts(LONG)

    chain = {  # what each row trained for: its own training plus the trainings it started from
        "baseline": [baseline.exp_dir],
        CONTROL.name: [baseline.exp_dir, control.exp_dir],
        LONG: [baseline.exp_dir] + ([long_control.exp_dir] if long_control else []),
        "searched": [baseline.exp_dir] * (args.search_run == "darts_search_warm") + [
            darts / f"asr_{args.variant.split('_')[0]}_stage1", darts / f"asr_{args.variant}_stage2", searched.exp_dir],
    }
    chain["pipeline"] = chain["searched"] + [qat.exp_dir]
    base_bytes = vs_base.rows[0].checkpoint_bytes  # the baseline is the first row
    rows = []
    for row in vs_base.rows:
        name = row.spec.name
        parts = [training_summary(d) for d in chain[name]]
        timings = [read_train_seconds(d) for d in chain[name]]  # (wall, source, CPU or None)
        cpu = [c if c is not None else w for w, _, c in timings]  # wall time where CPU time is unknown
        sig = row.significance.get("test")
        size = row.checkpoint_bytes
        rows.append({
            "system": name, "wer": row.wer["test"].wer, "params": row.num_params, "bytes": size,
            "ratio": base_bytes / size,
            "trained": " + ".join(f"{s.epochs} ep/{s.updates} upd" for s in parts),
            "cpu_seconds": None if any(c is None for c in cpu) else sum(cpu),
            "wall_in_time": any(c is None for _, _, c in timings),
            "vs_baseline": verdict_text(sig), "p_baseline": None if sig is None else sig.p_value,
            "vs_controls": {ref: ("reference" if name == ref else verdict_text(v[name]) if name in v else "")
                            for ref, v in controls.items()},
        })
    lines = [
        "# Whole pipeline: DARTS-searched architecture -> KL mixed precision -> QAT -> packed file", "",
        f"Searched model: `{args.variant}` of `{args.search_run}` (stage 1 on 80% of train"
        f"{', warm-started from the baseline' if args.search_run.endswith('warm') else ''}, stage 2 on the held-out "
        f"20%, derived and fine-tuned on all of train). Allocation: {alloc.avg_bits:.3f} average bits over "
        f"{len(alloc.bits)} measured layers (budget {args.budget:g}, Omega on {table.num_utts} dev utterances); subsampling "
        f"Conv2d, token embedding and CTC projection at "
        f"{args.front_bits or 'fp32'}{' bits' if args.front_bits else ''}. The pipeline row is the packed file "
        f"(`export_packed`); the others are fp32 checkpoints. MAPSSWE two-sided, alpha 0.05. Training time: "
        f"CPU time (user+sys) of every stage, summed; * = a stage's CPU time is unknown (a training the main "
        f"job ran without this timer) and its wall time from train.log is counted instead."
        + (f" `{LONG}`: the baseline fine-tuned {args.long_control_epochs} epochs with the control's schedule, "
           f"about as many weight updates as the pipeline's stages after the baseline." if long_control else ""), "",
        "| system | trained for (each stage: epochs / updates) | training time | parameters | bytes | x smaller "
        "| WER test | vs baseline | " + " | ".join(f"vs {ref}" for ref in controls) + " |",
        "|---|---|---:|---:|---:|---:|---:|---|" + "---|" * len(controls),
    ]
    for r in rows:
        star = "*" if r["wall_in_time"] else ""
        cpu = "?" if r["cpu_seconds"] is None else f"{r['cpu_seconds'] / 60:.0f} min{star}"
        lines.append(f"| {r['system']} | {r['trained']} | {cpu} | {r['params']:,} | {r['bytes']:,} | "
                     f"{r['ratio']:.1f}x | {r['wer']:.2f}% | {r['vs_baseline']} | "
                     + " | ".join(r["vs_controls"].values()) + " |")
    out = exp_dir / "benchmarks"
    atomic_write_text(out / f"whole_pipeline_{tag}.md", "\n".join(lines) + "\n")
    atomic_write_text(out / f"whole_pipeline_{tag}.json", json.dumps(
        {"rows": rows, "allocation": {"avg_bits": alloc.avg_bits, "omega": alloc.omega, "bits": alloc.bits},
         "budget": args.budget, "front_bits": args.front_bits, "variant": args.variant}, indent=2) + "\n")
    plt = plot_setup()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["bytes"] / 1e6, r["wer"], label=f"{r['system']} ({r['vs_baseline']})",
                   marker="s" if r["system"] == "baseline" else "o")
    ax.set_xscale("log")
    save_plot(fig, ax, out / f"whole_pipeline_{tag}_wer_vs_bytes.png", "file on disk (MB, log)", "WER test (%)",
              "search -> mixed precision -> QAT")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
