"""Quantization benchmark on the tiny test set: sizes, WER, encoder throughput and decode RTF.

Measured side by side in one run, each as a ratio to the fp32 stock model:

* ``fp32``: the stock ESPnet checkpoint;
* ``espnet_dynamic_int8``: the same checkpoint with ESPnet's ``quantize_asr_model`` (PyTorch
  dynamic int8 of every Linear, what ``asr_inference --quantize_asr_model true`` does);
* ``packed_<n>bit``: our QAT models, exported packed and loaded by stock ``Speech2Text``.

Usage (after the main job, which trains the fp32 baseline and the 8/4-bit QAT systems)::

    .venv/bin/python benchmarks/quantization.py --exp_dir exp/tiny [--bits 8 4 2] [--num_utts 300]

Missing QAT systems (e.g. 2-bit) are trained first with the same stock programs. Prints a table
and writes ``<exp_dir>/benchmarks/quantization.{md,json}`` and a WER-vs-bytes plot.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import soundfile
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from espnet_compress.export.packed_export import PACKED_NAME, export_packed  # noqa: E402
from espnet_compress.pipeline.data import SYNTHETIC_DATA, resolve_corpus  # noqa: E402
from espnet_compress.pipeline.stages import AsrExperiment  # noqa: E402
from espnet_compress.pipeline.tiny import CONF_DIR  # noqa: E402
from espnet_compress.scoring.sclite import score  # noqa: E402
from espnet_compress.scoring.significance import mapsswe  # noqa: E402
from espnet_compress.utils.io import atomic_write_text  # noqa: E402

log = logging.getLogger("benchmark")
WARMUP = 5


@dataclasses.dataclass
class Row:
    name: str
    checkpoint_bytes: int
    wer: float = float("nan")
    verdict: str = ""
    encoder_seconds: float = float("nan")
    decode_seconds: float = float("nan")
    audio_seconds: float = float("nan")
    inference_paths: str = ""

    @property
    def encoder_rtf(self) -> float:
        return self.encoder_seconds / self.audio_seconds

    @property
    def decode_rtf(self) -> float:
        return self.decode_seconds / self.audio_seconds


def _qat_experiment(exp_dir: Path, bits: int, baseline: AsrExperiment) -> AsrExperiment:
    config = CONF_DIR / f"train_asr_quantized_conformer_tiny_{bits}bit.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no QAT config for {bits} bits: {config}")
    return dataclasses.replace(
        baseline, exp_dir=exp_dir / f"asr_qat_{bits}bit", train_config=config,
        train_args=["--init_param", str(baseline.exp_dir / baseline.inference_model)],
    )


def _load(config: Path, model: Path, quantize: bool):
    from espnet2.bin.asr_inference import Speech2Text

    decode_conf = {"beam_size": 5, "ctc_weight": 0.3, "penalty": 0.0, "maxlenratio": 0.0, "nbest": 1}
    return Speech2Text(asr_train_config=str(config), asr_model_file=str(model), device="cpu",
                       quantize_asr_model=quantize, **decode_conf)


def _measure(name: str, s2t, utts: Sequence[tuple], out: Path) -> Row:
    """Time the encoder alone and the full joint CTC/attention decode, one utterance at a time."""
    enc_time = dec_time = audio = 0.0
    hyps: List[str] = []
    model = s2t.asr_model
    for _, wav in utts[:WARMUP]:  # untimed: first calls pay allocator/thread-pool start-up
        s2t(soundfile.read(wav, dtype="float32")[0])
    for utt, wav in tqdm(utts, desc=name, leave=False):
        speech, fs = soundfile.read(wav, dtype="float32")
        audio += len(speech) / fs
        x = torch.from_numpy(speech)[None]
        with torch.no_grad():
            start = time.perf_counter()
            model.encode(x, torch.tensor([x.shape[1]]))
            enc_time += time.perf_counter() - start
            start = time.perf_counter()
            text = s2t(speech)[0][0]
            dec_time += time.perf_counter() - start
        hyps.append(f"{utt} {text}".rstrip())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "text", "\n".join(hyps) + "\n")
    paths = getattr(model, "inference_paths", None)
    summary = ""
    if paths:
        counts: Dict[str, int] = {}
        for p in paths.values():
            counts[p] = counts.get(p, 0) + 1
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return Row(name, 0, encoder_seconds=enc_time, decode_seconds=dec_time, audio_seconds=audio, inference_paths=summary)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp_dir", type=Path, default=Path("exp/tiny"))
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--num_utts", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the timing (1 = per-core figures)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    exp_dir = args.exp_dir.resolve()
    baseline_config = CONF_DIR / "train_asr_conformer_tiny.yaml"
    try:  # the user's corpus if the main job ran on one (--data_dir), else the synthetic one
        corpus = resolve_corpus(exp_dir, None, [baseline_config])
    except ValueError as err:  # also DataDirError: the corpus changed since the main job ran
        print(f"benchmark: {err}", file=sys.stderr)
        return 2
    data = corpus.path if corpus is not None else exp_dir / SYNTHETIC_DATA
    baseline = AsrExperiment(
        data_dir=data, train_set="train", valid_set="dev", test_sets=["test"],
        token_list=exp_dir / "token_list" / "word" / "tokens.txt", stats_dir=exp_dir / "asr_stats",
        exp_dir=exp_dir / "asr_conformer", train_config=baseline_config,
        inference_config=CONF_DIR / "decode_asr.yaml",
    )
    fp32_model = baseline.exp_dir / baseline.inference_model
    if not fp32_model.exists():
        print(f"benchmark: {fp32_model} not found; run the main job first (README)", file=sys.stderr)
        return 2
    systems = [("fp32", baseline.exp_dir / "config.yaml", fp32_model, False),
               ("espnet_dynamic_int8", baseline.exp_dir / "config.yaml", fp32_model, True)]
    for bits in args.bits:
        qat = _qat_experiment(exp_dir, bits, baseline)
        qat.train()
        packed_dir = qat.exp_dir / "packed"
        if not (packed_dir / PACKED_NAME).exists():
            export_packed(qat.exp_dir / "config.yaml", qat.exp_dir / qat.inference_model, packed_dir)
        systems.append((f"packed_{bits}bit", packed_dir / "config.yaml", packed_dir / PACKED_NAME, False))

    wav_scp = [ln.split(maxsplit=1) for ln in (data / "test" / "wav.scp").read_text().splitlines()]
    utts = wav_scp[: args.num_utts]
    ref = data / "test" / "text"
    ref_subset = exp_dir / "benchmarks" / "ref_text"
    keep = {u for u, _ in utts}
    ref_subset.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ref_subset, "".join(ln + "\n" for ln in ref.read_text().splitlines() if ln.split()[0] in keep))
    rows: List[Row] = []
    wers = {}
    for name, config, model, dyn in systems:
        s2t = _load(config, model, dyn)
        row = _measure(name, s2t, utts, exp_dir / "benchmarks" / name)
        row.checkpoint_bytes = model.stat().st_size
        wers[name] = score(ref_subset, exp_dir / "benchmarks" / name / "text", exp_dir / "benchmarks" / name / "score", name)
        row.wer = wers[name].wer
        rows.append(row)
        del s2t
    for row in rows[1:]:
        sig = mapsswe(wers["fp32"], wers[row.name], exp_dir / "benchmarks" / row.name / "mapsswe")
        row.verdict = "lossless" if sig.lossless else f"worse (p={sig.p_value:.3g})"
    rows[0].verdict = "baseline"
    base = rows[0]
    header = ("| system | bytes | size vs fp32 | WER % | MAPSSWE vs fp32 | encoder RTF | speed-up | decode RTF | "
              "speed-up | inference paths |")
    lines = [header, "|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.checkpoint_bytes:,} | {base.checkpoint_bytes / r.checkpoint_bytes:.2f}x | {r.wer:.2f} | "
            f"{r.verdict} | {r.encoder_rtf:.4f} | {base.encoder_rtf / r.encoder_rtf:.2f}x | {r.decode_rtf:.4f} | "
            f"{base.decode_rtf / r.decode_rtf:.2f}x | {r.inference_paths} |"
        )
    table = "\n".join(lines)
    note = (f"\nTimed after {WARMUP} untimed warm-up decodes per system. {len(utts)} test utterances ({base.audio_seconds:.0f} s of audio), batch 1, beam 5, "
            f"{args.threads} torch thread(s), one run on this machine (run-to-run noise is about 15%).\n")
    print(table + note)
    out = exp_dir / "benchmarks"
    atomic_write_text(out / "quantization.md", table + note)
    atomic_write_text(out / "quantization.json", json.dumps(
        [dict(dataclasses.asdict(r), encoder_rtf=r.encoder_rtf, decode_rtf=r.decode_rtf) for r in rows], indent=2) + "\n")
    _plot(rows, out / "quantization_wer_vs_bytes.png")
    return 0


def _plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r.checkpoint_bytes / 1e6, r.wer)
        ax.annotate(r.name, (r.checkpoint_bytes / 1e6, r.wer), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("checkpoint size on disk (MB)")
    ax.set_ylabel("WER (%)")
    ax.set_title("spoken_commands test: WER vs bytes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
