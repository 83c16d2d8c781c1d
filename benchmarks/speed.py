"""CPU speed at a realistic size: the LibriSpeech-100 Conformer (conf/librispeech_100), one thread.

Random weights (speed does not depend on them); batch 1; several utterance lengths. For every
configuration, in its own subprocess (so peak RSS after load is that configuration's alone):

* ``fp32``: the float model (ESPnet's own Conformer);
* ``fp32_float_paths``: the same float model with everything a packed model's load does that is
  not quantization: the two float paths its ``auto`` picks (front end's first convolution as an
  im2col GEMM, depthwise convolutions as shift-adds; ``espnet_compress.quant.inference``) and the
  decoder's per-utterance key/value cache of the source attention
  (``espnet_compress.models.memory_cache``), attention without masks that mask nothing
  (``espnet_compress.models.full_masks``) and the decoder step without ESPnet's per-module
  wrappers (``espnet_compress.models.decoder_step``): the control for the share of a packed model's speed-up
  that is not quantization;
* ``torch_dynamic_int8``: every Linear through PyTorch's dynamic int8 (what ESPnet's
  ``asr_inference --quantize_asr_model true`` does; fp weights re-quantized at load);
* ``packed<n>_<kernel>``: a QAT model (front end, encoder, decoder, embedding, output layer and
  CTC projection at n bits, per-channel) packed with :mod:`espnet_compress.quant.packed`, loaded
  back through the same hook stock ``Speech2Text`` uses, frozen on one kernel (``dequant`` | ``qdyn`` | ``int4`` | ``auto``);
* ``nested_<name>[_packed8]``: the structural systems a nested supernet exports (fewer blocks,
  narrower FFN), fp32 and packed 8-bit on ``auto``.

Timed: encoder forward, and a full decode = encoder + CTC posteriors + greedy attention decoding
of ``--tokens_per_second`` tokens per second of audio (incremental decoder with cache, one token per
step). ``--beam N`` decodes instead with ESPnet's ``BatchBeamSearch`` as ``asr_inference`` builds it
(attention decoder + CTC prefix scorer, the weights of ``conf/librispeech_100/decode_asr.yaml``),
run for the same number of steps (random weights give no meaningful end of sentence, so the length
is fixed; ended hypotheses are not removed). Each time is the minimum of
``--repeats`` runs after a warm-up (the least disturbed by other processes on a shared machine).

``--isa avx2`` caps every library's instruction set at AVX2 (fbgemm, oneDNN, MKL, ATen dispatch;
``ISA_CAPS``) in the timed processes: what a CPU without AVX-512 and VNNI would see, emulated on
this one (same clock and caches), for the speed-ups' dependence on VNNI.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speed.py --out exp/speed [--seconds 2 5 10] [--isa avx2]

Prints the table and writes ``<out>/speed.{md,json}`` and ``<out>/speed.png``.

``--interleaved`` times the encoder forward and the full decode (greedy, or ``--beam``) of all
``--configs`` loaded into ONE process and taking turns, ``--repeats`` rounds
(``speed_interleaved.{md,json}``): the side-by-side measurement
for a ratio on a machine whose speed drifts (runs of one process per config, timed one after the
other, spread by 15% and more here).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FEAT_DIM = 80
VOCAB = 5000
FRAMES_PER_SECOND = 100  # 10 ms hop

from espnet_compress.env import ISA_CAP_VARIABLES  # noqa: E402  (light: no torch)

#: name -> (model options, packed bits (0 = float), kernel or "torch_dynamic")
CONFIGS: Dict[str, Dict[str, Any]] = {
    "fp32": {},
    "fp32_float_paths": {"float_paths": True},
    "torch_dynamic_int8": {"torch_dynamic": True},
    "packed8_dequant": {"bits": 8, "kernel": "dequant"},
    "packed8_qdyn": {"bits": 8, "kernel": "qdyn"},
    "packed8_auto": {"bits": 8, "kernel": "auto"},
    "packed4_dequant": {"bits": 4, "kernel": "dequant"},
    "packed4_int4": {"bits": 4, "kernel": "int4"},
    "packed4_qdyn": {"bits": 4, "kernel": "qdyn"},
    "packed4_auto": {"bits": 4, "kernel": "auto"},
    "nested_6blocks": {"num_blocks": 6},
    "nested_6blocks_packed8": {"num_blocks": 6, "bits": 8, "kernel": "auto"},
    "nested_ffn512": {"linear_units": 512},
    "nested_ffn512_packed8": {"linear_units": 512, "bits": 8, "kernel": "auto"},
    "nested_6blocks_ffn512_packed8": {"num_blocks": 6, "linear_units": 512, "bits": 8, "kernel": "auto"},
}


#: --isa -> environment of the timed processes (each library reads its own variable)
ISA_CAPS: Dict[str, Dict[str, str]] = {
    "native": {},
    "avx2": dict(zip(ISA_CAP_VARIABLES, ("AVX2", "AVX2", "AVX2", "avx2"))),
}


def _conf() -> Dict[str, Any]:
    import yaml

    return yaml.safe_load((REPO / "conf/librispeech_100/train_asr_conformer.yaml").read_text())


def build(spec: Mapping[str, Any]):
    """The LibriSpeech-100 Conformer hybrid model (eval mode, random weights) for one config."""
    import torch
    from espnet2.asr.ctc import CTC
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

    from espnet_compress.encoders.aliases import QuantizedConformerEncoder
    from espnet_compress.models.compressed_asr import CompressedASRModel

    conf = _conf()
    enc_conf = dict(conf["encoder_conf"], dropout_rate=0.0, positional_dropout_rate=0.0, attention_dropout_rate=0.0)
    for key in ("num_blocks", "linear_units"):
        if key in spec:
            enc_conf[key] = spec[key]
    bits = spec.get("bits", 0)
    dec_conf = {k: (0.0 if k.endswith("dropout_rate") else v) for k, v in conf["decoder_conf"].items()}
    torch.manual_seed(0)
    quant = {"bits": bits, "per_channel": True} if bits else None
    # float configs are ESPnet's own Conformer: what a user compares against, and plain nn.Linear
    # layers for torch's quantize_dynamic (it swaps exact types only)
    encoder = QuantizedConformerEncoder(FEAT_DIM, quant_conf=dict(quant, conv2d=True), **enc_conf) if quant \
        else ConformerEncoder(FEAT_DIM, **enc_conf)
    d = enc_conf["output_size"]
    token_list = ["<blank>", *[f"t{i}" for i in range(VOCAB - 2)], "<sos/eos>"]
    return CompressedASRModel(
        vocab_size=VOCAB, token_list=token_list, frontend=None, specaug=None, normalize=None, preencoder=None,
        encoder=encoder, postencoder=None, decoder=TransformerDecoder(VOCAB, d, **dec_conf), ctc=CTC(VOCAB, d),
        joint_network=None, decoder_quant=dict(quant, embedding=True, ctc=True) if quant else None,
        **conf["model_conf"]).eval()


def with_float_paths(model):
    """Swap the stock layers a packed model's ``auto`` moves to float paths (one-channel Conv2d ->
    im2col GEMM, depthwise Conv1d -> shift-adds), with their own fp32 weights, and apply the rest
    of a packed model's load (:func:`espnet_compress.quant.packed.decode_time_paths`)."""
    import torch

    from espnet_compress.quant.inference import Im2colConv2d, ShiftAddDepthwiseConv1d
    from espnet_compress.quant.packed import decode_time_paths

    decode_time_paths(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 1:
            new = Im2colConv2d(module.weight, module.bias, module.stride, module.padding)
        elif isinstance(module, torch.nn.Conv1d) and module.groups == module.in_channels > 1:
            new = ShiftAddDepthwiseConv1d(module.weight, module.bias, module.padding[0])
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def _rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    """Resident set size now (MB; Linux /proc), i.e. what the loaded model keeps."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pack(name: str, scratch: Path) -> Path:
    """Write the packed file of a quantized config (own process: keeps its memory out of the worker's)."""
    from espnet_compress.quant.packed import save_packed

    path = scratch / f"{name}.packed.pth"
    save_packed(build(CONFIGS[name]), path)
    return path


def _min_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def beam_search_steps(model, beam: int) -> Callable[[Any, int], None]:
    """``run(encoder_output, steps)``: ESPnet's batch beam search (decoder + CTC prefix scorer +
    length bonus, weighted as the LibriSpeech-100 decode config) for a fixed number of steps."""
    import yaml
    from espnet.nets.batch_beam_search import BatchBeamSearch
    from espnet.nets.scorers.ctc import CTCPrefixScorer
    from espnet.nets.scorers.length_bonus import LengthBonus

    conf = yaml.safe_load((REPO / "conf/librispeech_100/decode_asr.yaml").read_text())
    ctc_weight = conf["ctc_weight"]
    search = BatchBeamSearch(
        scorers={"decoder": model.decoder, "ctc": CTCPrefixScorer(model.ctc, model.eos),
                 "length_bonus": LengthBonus(VOCAB)},
        weights={"decoder": 1.0 - ctc_weight, "ctc": ctc_weight, "length_bonus": conf["penalty"]},
        beam_size=beam, vocab_size=VOCAB, sos=model.sos, eos=model.eos, token_list=model.token_list,
        pre_beam_score_key="full").eval()

    def run(enc, steps: int) -> None:
        hyps = search.init_hyp(enc[0])
        for _ in range(steps):
            hyps = search.search(hyps, enc[0])

    return run


def full_decode(model, x, lens, n_tokens: int, beam_run: Optional[Callable[[Any, int], None]]) -> Callable[[], None]:
    """One full decode of ``x`` to time: encoder, then ``beam_run`` for ``n_tokens`` steps, or greedy
    (CTC posteriors, then ``n_tokens`` attention-decoder steps with its self-attention cache)."""
    import torch

    def decode() -> None:
        enc, _ = model.encode(x, lens)
        if beam_run is not None:
            beam_run(enc, n_tokens)
            return
        model.ctc.log_softmax(enc)
        ys = torch.full((1, 1), VOCAB - 1, dtype=torch.long)
        cache = None
        for _ in range(n_tokens):
            logp, cache = model.decoder.forward_one_step(ys, torch.ones(1, ys.size(1), ys.size(1), dtype=torch.bool)
                                                         .tril(), enc, cache=cache)
            ys = torch.cat([ys, logp.argmax(-1, keepdim=True)], dim=1)

    return decode


def _tokens(seconds: float, tokens_per_second: float) -> int:
    return max(1, int(round(seconds * tokens_per_second)))


def load(name: str, scratch: Path) -> Tuple[Any, int, Dict[str, int], float]:
    """(model ready to time, file bytes, layers per inference path, peak RSS before the load) of one
    config: packed configs load their file (written by :func:`pack`) through the hook stock
    ``Speech2Text`` uses; float configs save and load their own state dict the same way."""
    import collections

    import torch

    spec = CONFIGS[name]
    paths: Dict[str, int] = {}
    if spec.get("bits"):
        from espnet_compress.env import KERNEL

        path = scratch / f"{name}.packed.pth"
        file_bytes = path.stat().st_size
        os.environ[KERNEL] = spec["kernel"]
        model = build(spec)
        rss_before = _rss_mb()
        model.load_state_dict(torch.load(path, weights_only=True), strict=False)  # as Speech2Text loads
        paths = dict(collections.Counter(model.inference_paths.values()))
        path.unlink()
    else:
        model = build(spec)
        rss_before = _rss_mb()
        path = scratch / f"{name}.pth"
        torch.save(model.state_dict(), path)
        file_bytes = path.stat().st_size
        model.load_state_dict(torch.load(path, weights_only=True))
        path.unlink()
        if spec.get("float_paths"):
            model = with_float_paths(model)
        if spec.get("torch_dynamic"):
            from espnet2.bin.asr_inference import Speech2Text  # noqa: F401  (ESPnet's own quantize path)

            quantize_dynamic = getattr(torch.ao.quantization, "quantize_dynamic", None) or torch.quantization.quantize_dynamic
            model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model, file_bytes, paths, rss_before


def worker(name: str, seconds: List[float], repeats: int, tokens_per_second: float, scratch: Path,
           beam: int = 0) -> Dict[str, Any]:
    """Build, (pack, load), time; runs in its own process."""
    import torch

    torch.set_num_threads(1)
    model, file_bytes, paths, rss_before = load(name, scratch)
    import gc

    gc.collect()
    rss = _rss_mb()
    from espnet_compress.quant.inference import cpu_features

    out: Dict[str, Any] = {"name": name, "cpu": cpu_features(), "file_bytes": file_bytes, "peak_rss_mb_after_load": rss,
                           "rss_mb_after_load": _current_rss_mb(),
                           "rss_before_load_mb": rss_before, "paths": paths, "encoder_s": {}, "decode_s": {}}
    beam_run = beam_search_steps(model, beam) if beam else None
    for sec in seconds:
        x, lens = _utterance(sec)
        n_tokens = _tokens(sec, tokens_per_second)
        with torch.inference_mode():
            out["encoder_s"][str(sec)] = _min_time(lambda: model.encode(x, lens), repeats)

            out["decode_s"][str(sec)] = _min_time(full_decode(model, x, lens, n_tokens, beam_run), max(1, repeats // 2))
    out["peak_rss_mb_after_runs"] = _rss_mb()
    return out


def _utterance(seconds: float) -> Tuple[Any, Any]:
    """(features, lengths) of one random utterance of that length (batch 1)."""
    import torch

    frames = int(seconds * FRAMES_PER_SECOND)
    return torch.randn(1, frames, FEAT_DIM, generator=torch.Generator().manual_seed(1)), torch.tensor([frames])


def interleaved_worker(names: List[str], seconds: List[float], rounds: int, scratch: Path,
                       tokens_per_second: float, beam: int = 0) -> Dict[str, Any]:
    """Encoder forward and full decode of every config in ONE process, the configs taking turns in
    each of ``rounds`` rounds: a drift of the machine's speed (other processes, clock) then hits
    every config alike, which one process per config, timed one after the other, cannot promise."""
    import torch

    from espnet_compress.quant.inference import cpu_features

    torch.set_num_threads(1)
    models = {name: load(name, scratch)[0] for name in names}
    beam_runs = {name: beam_search_steps(model, beam) if beam else None for name, model in models.items()}
    out: Dict[str, Any] = {"cpu": cpu_features(), "rounds": rounds, "encoder_s": {name: {} for name in names},
                           "decode_s": {name: {} for name in names}}
    for sec in seconds:
        x, lens = _utterance(sec)
        runs = {"encoder_s": {name: (lambda m=model: m.encode(x, lens)) for name, model in models.items()},
                "decode_s": {name: full_decode(model, x, lens, _tokens(sec, tokens_per_second), beam_runs[name])
                             for name, model in models.items()}}
        with torch.inference_mode():
            for kind, fns in runs.items():
                for fn in fns.values():
                    fn()  # warm-up
                times: Dict[str, List[float]] = {name: [] for name in names}
                for _ in range(rounds):
                    for name, fn in fns.items():
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
                for name in names:
                    out[kind][name][str(sec)] = times[name]
    return out


def _interleaved_table(result: Dict[str, Any], seconds: List[float], isa: str, decoding_text: str) -> str:
    import statistics

    lines = ["# Speed, configs timed in turns in one process (LibriSpeech-100 Conformer, one thread, batch 1)", "",
             f"CPU: {result['cpu']} (--isa {isa}). {result['rounds']} rounds per length, each config once per round. "
             f"Decode: encoder + {decoding_text}.",
             "Speed-up = fp32 time / config time, of the fastest round (min) and of the median round."]
    for kind, title in (("encoder_s", "enc"), ("decode_s", "decode")):
        base = result[kind]["fp32"]
        lines += ["", "| config | " + " | ".join(f"{title} {s:g}s ms min / median (x min / median)" for s in seconds)
                  + " |", "|---|" + "---:|" * len(seconds)]
        for name, per_len in result[kind].items():
            cells = []
            for s in seconds:
                t, b = per_len[str(s)], base[str(s)]
                cells.append(f"{min(t) * 1e3:.0f} / {statistics.median(t) * 1e3:.0f} "
                             f"({min(b) / min(t):.2f} / {statistics.median(b) / statistics.median(t):.2f}x)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _table(results: List[Dict[str, Any]], seconds: List[float], isa: str, decoding: str) -> str:
    base = next(r for r in results if r["name"] == "fp32")
    lines = [f"# Speed at the LibriSpeech-100 Conformer size (one thread, batch 1)", "",
             f"CPU: {base['cpu']} (--isa {isa}). Decode: {decoding}.", "",
             "Speed-up = fp32 time / config time, measured side by side in this run (min of repeats). "
             "Peak RSS: high-water mark after load (ESPnet builds the float model, then loads the "
             "file into it); now: resident after load and freeze; after runs: the process's high-water mark "
             "once every length has been encoded and decoded (what a deployed decoder's memory limit must "
             "allow).", "",
             "| config | file MB | peak RSS MB (now) | peak RSS after runs MB | kernels | "
             + " | ".join(f"enc {s:g}s ms (x)" for s in seconds) + " | "
             + " | ".join(f"decode {s:g}s ms (x)" for s in seconds) + " |",
             "|---|---:|---:|---:|---|" + "---:|" * (2 * len(seconds))]
    for r in results:
        enc = [f"{r['encoder_s'][str(s)] * 1e3:.0f} ({base['encoder_s'][str(s)] / r['encoder_s'][str(s)]:.2f}x)"
               for s in seconds]
        dec = [f"{r['decode_s'][str(s)] * 1e3:.0f} ({base['decode_s'][str(s)] / r['decode_s'][str(s)]:.2f}x)"
               for s in seconds]
        kernels = ", ".join(f"{k}: {v}" for k, v in sorted(r["paths"].items())) or "-"
        lines.append(f"| {r['name']} | {r['file_bytes'] / 1e6:.1f} | {r['peak_rss_mb_after_load']:.0f} ({r['rss_mb_after_load']:.0f}) | "
                     f"{r['peak_rss_mb_after_runs']:.0f} | {kernels} | "
                     + " | ".join(enc + dec) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: List[Dict[str, Any]], seconds: List[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.nested_supernet import save_plot

    base = next(r for r in results if r["name"] == "fp32")
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        ax.plot(seconds, [base["encoder_s"][str(s)] / r["encoder_s"][str(s)] for s in seconds], marker="o",
                label=r["name"])
    ax.axhline(1.0, color="black", lw=0.8)
    save_plot(fig, ax, path, "utterance length (s)", "encoder forward speed-up vs fp32",
              "LibriSpeech-100 Conformer, one thread", legend_size=7)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "exp" / "speed")
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens_per_second", type=float, default=3.0)
    parser.add_argument("--beam", type=int, default=0,
                        help="decode with ESPnet's batch beam search of this size (0: greedy decoder steps)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--isa", choices=list(ISA_CAPS), default="native",
                        help="instruction-set cap of the timed processes (see ISA_CAPS)")
    parser.add_argument("--interleaved", action="store_true",
                        help="time the encoder forward and the full decode of all --configs in one process, "
                             "taking turns (--repeats rounds); writes speed_interleaved.{md,json}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--interleaved_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pack", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.beam < 0:
        parser.error(f"--beam {args.beam}: a beam size is >= 1 (or 0 for greedy decoding)")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least one timed run (or round) per length")
    if any(sec <= 0 for sec in args.seconds):
        parser.error(f"--seconds {' '.join(f'{s:g}' for s in args.seconds)}: utterance lengths are > 0")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pack:
        pack(args.pack, args.out)
        return
    names = ["fp32", *[c for c in args.configs if c != "fp32"]]
    if args.worker:
        print(json.dumps(worker(args.worker, args.seconds, args.repeats, args.tokens_per_second, args.out, args.beam)))
        return
    if args.interleaved_worker:
        print(json.dumps(interleaved_worker(names, args.seconds, args.repeats, args.out, args.tokens_per_second,
                                            args.beam)))
        return
    from tqdm import tqdm

    from espnet_compress.utils.io import atomic_write_text

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **ISA_CAPS[args.isa])
    for name in names:
        if CONFIGS[name].get("bits"):
            done = subprocess.run([sys.executable, __file__, "--pack", name, "--out", str(args.out)],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                raise RuntimeError(f"packing {name} failed:\n{done.stderr[-3000:]}")
    decoding = (f"ESPnet batch beam search, beam {args.beam}, {args.tokens_per_second:g} steps per second of audio"
                if args.beam else f"greedy, {args.tokens_per_second:g} tokens per second of audio")
    if args.interleaved:
        cmd = [sys.executable, __file__, "--interleaved_worker", "--configs", *names, "--out", str(args.out),
               "--repeats", str(args.repeats), "--tokens_per_second", str(args.tokens_per_second),
               "--beam", str(args.beam), "--seconds", *map(str, args.seconds)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"interleaved timing failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        md = _interleaved_table(result, args.seconds, args.isa, decoding)
        atomic_write_text(args.out / "speed_interleaved.md", md)
        atomic_write_text(args.out / "speed_interleaved.json",
                          json.dumps({"isa": args.isa, "caps": ISA_CAPS[args.isa], **result}, indent=2) + "\n")
        print(md)
        return
    results = []
    for name in tqdm(names, desc="configs"):
        cmd = [sys.executable, __file__, "--worker", name, "--out", str(args.out), "--repeats", str(args.repeats),
               "--tokens_per_second", str(args.tokens_per_second), "--beam", str(args.beam),
               "--seconds", *map(str, args.seconds)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"config {name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    load1 = os.getloadavg()[0]
    md = _table(results, args.seconds, args.isa, decoding) + f"\nLoad average (1 min) at the end: {load1:.2f} on {os.cpu_count()} cores.\n"
    atomic_write_text(args.out / "speed.md", md)
    atomic_write_text(args.out / "speed.json", json.dumps({"isa": args.isa, "caps": ISA_CAPS[args.isa], "results": results}, indent=2) + "\n")
    _plot(results, args.seconds, args.out / "speed.png")
    print(md)


if __name__ == "__main__":
    main()
