"""Training memory of a foldable seed unfolded to depth N vs an N-block physical Conformer.

The foldable paper's memory claim: the seed's physical blocks are loaded once however deep it is
unfolded, so parameters, gradients and optimizer (Adam) state are those of the seed. Activations
saved for backward scale with the *executed* depth, so they are not reduced. This benchmark
measures both, for a few training steps (forward, backward, Adam step) on random input of the
corpus's shape, each model in a fresh subprocess:

* parameters, and bytes of parameters, gradients and Adam state (``exp_avg``/``exp_avg_sq``/``step``,
  summed from the optimizer's state after the steps: exact);
* activation bytes saved for backward in one forward pass (every tensor autograd saves, via
  ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, parameters excluded: exact);
* peak resident memory of the process, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, as a total and
  as the increase over the RSS right after importing ESPnet (before the model is built). Why RSS:
  torch's CPU tensors are allocated with the C allocator, which ``tracemalloc`` (Python allocations
  only) does not see, and the profiler's memory events need a timeline reconstruction; peak RSS is
  what the OS actually had to provide, including allocator slack. Each model runs in its own fresh
  process so no model inherits another's high-water mark; the figure includes allocator noise
  (a few MB), hence the exact byte counts next to it.

Models (tiny preset, ``conf/spoken_commands``): the 4-block stock Conformer baseline; the 2-block
seed trained only at depth 4 (``..._foldable_conformer_tiny_depth4only.yaml``); the joint foldable
model (depth 4 + seed + KL, two forwards per step); the 2-block Conformer for reference. The
``swbd`` preset compares the 12-block SWBD Conformer with the 6-block seed unfolded to 12 (slow
on a CPU: a few minutes).

Usage::

    nice -n 19 .venv/bin/python benchmarks/foldable_memory.py --exp_dir exp/tiny

Input shape (tiny preset): if ``<exp_dir>/asr_stats/train/speech_shape`` exists, the median utterance length
and the batch size that the config's ``batch_bins`` (numel batches) gives it; else 48 x 150 frames;
feature dimension = the config's ``frontend_conf.n_mels``. swbd preset: 4 x 500 frames x 80.
Writes ``<exp_dir>/benchmarks/foldable_memory.{md,json}``. Nothing is trained to disk, so there is
nothing to restart; a run takes about a minute (tiny preset).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from espnet_compress.utils.io import atomic_write_text  # noqa: E402

log = logging.getLogger("benchmark")
TINY = REPO / "conf" / "spoken_commands"
SWBD = REPO / "conf" / "swbd"

#: preset -> [(name, config, physical blocks, executed depth, single_loss)]; single_loss drops
#: model_conf.systems (trains the default plan only) for presets without a depth-only config.
PRESETS = {
    "tiny": [
        ("conformer_4blocks", TINY / "train_asr_conformer_tiny.yaml", 4, "4", False),
        ("seed2_at_depth4", TINY / "train_asr_foldable_conformer_tiny_depth4only.yaml", 2, "4", False),
        ("seed2_joint_kl", TINY / "train_asr_foldable_conformer_tiny.yaml", 2, "4+2", False),
        ("conformer_2blocks", TINY / "train_asr_conformer_tiny_2blocks.yaml", 2, "2", False),
    ],
    "swbd": [
        ("conformer_12blocks", SWBD / "train_asr_conformer.yaml", 12, "12", False),
        ("seed6_at_depth12", SWBD / "train_asr_foldable_conformer.yaml", 6, "12", True),
        ("seed6_joint_kl", SWBD / "train_asr_foldable_conformer.yaml", 6, "12+6", False),
    ],
}
MB = 1024 * 1024


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


# ------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """One model in this (fresh) process; prints one JSON line."""
    import gc

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import espnet2.tasks.asr as asr_task  # the plugin registers itself on this import

    from espnet_compress import register

    register()  # idempotent; the import hook normally did it already
    conf = yaml.safe_load(Path(args.config).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(args.config)
        if args.single_loss:
            conf["model"] = "espnet"
            conf["model_conf"] = {k: v for k, v in conf["model_conf"].items()
                                  if k in ("ctc_weight", "lsm_weight", "length_normalized_loss")}
            config = Path(tmp) / "config.yaml"
            config.write_text(yaml.safe_dump(conf))
        tokens = Path(tmp) / "tokens.txt"
        tokens.write_text("\n".join(["<blank>", "<unk>"] + [f"w{i}" for i in range(args.vocab - 3)] + ["<sos/eos>"]) + "\n")
        parser = asr_task.ASRTask.get_parser()
        targs = parser.parse_args(["--config", str(config), "--token_list", str(tokens),
                                   "--input_size", str(args.feat_dim)])
        targs.normalize = None  # global_mvn needs corpus statistics; a fixed affine map costs nothing
        gc.collect()
        rss_imports = _maxrss_bytes()
        model = asr_task.ASRTask.build_model(targs)
        model.train()
        optimizer = asr_task.ASRTask.build_optimizers(targs, model)[0]
    params = list(model.parameters())
    param_ids = {p.untyped_storage().data_ptr() for p in params}
    n_params = sum(p.numel() for p in params)
    enc_params = sum(p.numel() for p in model.encoder.parameters())
    rss_model = _maxrss_bytes()

    g = torch.Generator().manual_seed(0)
    B, T, L = args.batch, args.frames, args.text_len
    speech = torch.randn(B, T, args.feat_dim, generator=g)
    speech_lengths = torch.full((B,), T, dtype=torch.long)
    text = torch.randint(2, args.vocab - 1, (B, L), generator=g)
    text_lengths = torch.full((B,), L, dtype=torch.long)

    saved_bytes = 0
    step_times: List[float] = []
    grad_bytes = 0
    for step in range(args.steps):
        start = time.perf_counter()
        if step == 0:
            seen: Dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in param_ids:
                    seen[ptr] = storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _, _ = model(speech, speech_lengths, text, text_lengths)
            saved_bytes = sum(seen.values())
        else:
            loss, _, _ = model(speech, speech_lengths, text, text_lengths)
        loss.backward()
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
    adam_bytes = sum(v.numel() * v.element_size() for state in optimizer.state.values()
                     for v in state.values() if torch.is_tensor(v))
    peak = _maxrss_bytes()
    print(json.dumps({
        "params": n_params, "encoder_params": enc_params,
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "grad_bytes": grad_bytes, "adam_state_bytes": adam_bytes, "saved_activation_bytes": saved_bytes,
        "rss_after_imports": rss_imports, "rss_after_build": rss_model, "peak_rss": peak,
        "step_seconds": statistics.median(step_times[1:] or step_times), "optimizer": type(optimizer).__name__,
    }))


# ------------------------------------------------------------------------------------- driver
@dataclasses.dataclass
class Row:
    name: str
    config: str
    physical_blocks: int
    executed_depth: str
    params: int
    encoder_params: int
    param_bytes: int
    grad_bytes: int
    adam_state_bytes: int
    saved_activation_bytes: int
    rss_after_imports: int
    rss_after_build: int
    peak_rss: int
    step_seconds: float
    optimizer: str

    @property
    def training_state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.adam_state_bytes

    @property
    def peak_increase(self) -> int:
        return self.peak_rss - self.rss_after_imports


def input_shape(exp_dir: Path, config: Path) -> tuple:
    """(batch, frames, feature dim, source): the frontend's mel bins; the corpus's median utterance
    length and the batch size the config's numel ``batch_bins`` gives utterances of that length."""
    conf = yaml.safe_load(config.read_text())
    frontend = conf.get("frontend_conf") or {}
    dim = int(frontend.get("n_mels", 80))
    shape = exp_dir / "asr_stats" / "train" / "speech_shape"
    if not shape.exists():
        return 48, 150, dim, "default 48 x 150 frames (no corpus stats found)"
    lengths = [int(ln.split()[1].split(",")[0]) for ln in shape.read_text().splitlines() if ln.strip()]
    hop = frontend.get("hop_length", 160)
    median = int(statistics.median(lengths))
    batch = max(1, min(64, int(conf.get("batch_bins", 1_000_000)) // median))
    return batch, median // hop + 1, dim, f"{shape} (median {median} samples, batch_bins {conf.get('batch_bins')})"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp_dir", type=Path, default=Path("exp/tiny"),
                   help="where outputs go; its asr_stats (if any) give the input shape (default: %(default)s)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=3, help="training steps per model (first one also counts saved activations)")
    p.add_argument("--batch", type=int, default=None, help="utterances per batch (default: from the corpus)")
    p.add_argument("--frames", type=int, default=None, help="feature frames per utterance (default: from the corpus)")
    p.add_argument("--text_len", type=int, default=4, help="tokens per utterance (spoken commands: a few words)")
    p.add_argument("--vocab", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    # worker mode (internal)
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--single_loss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--feat_dim", type=int, default=80, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    exp_dir = args.exp_dir.resolve()
    models = PRESETS[args.preset]
    if args.preset == "tiny":
        batch, frames, feat_dim, source = input_shape(exp_dir, models[0][1])
    else:  # not the tiny corpus: a few telephone utterances of ~5 s (GPU batches are far larger)
        batch, frames, feat_dim, source = 4, 500, 80, "preset default (4 x 5 s utterances)"
    if args.batch or args.frames:
        source = f"the command line (else {batch} x {frames}: {source})"
    batch, frames = args.batch or batch, args.frames or frames
    rows: List[Row] = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for k in ("ESPNET_COMPRESS_SYSTEM", "ESPNET_COMPRESS_PLAN"):
        env.pop(k, None)
    for name, config, physical, depth, single in tqdm(models, desc="models", unit="model"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", "--config", str(config),
               "--steps", str(args.steps), "--batch", str(batch), "--frames", str(frames), "--feat_dim", str(feat_dim),
               "--text_len", str(args.text_len), "--vocab", str(args.vocab), "--threads", str(args.threads)]
        if single:
            cmd.append("--single_loss")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"worker for {name} failed (exit {proc.returncode})")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(Row(name, str(config.relative_to(REPO)), physical, depth, **result))

    lines = [
        f"## Training memory: foldable seed vs physical Conformer ({args.preset})",
        "",
        "| model | physical blocks | executed depth | params | params+grads+Adam (MB) | Adam state (MB) | "
        "saved activations (MB) | peak RSS (MB) | peak RSS - post-import RSS (MB) | s/step |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.physical_blocks} | {r.executed_depth} | {r.params:,} | {r.training_state_bytes / MB:.1f} | "
            f"{r.adam_state_bytes / MB:.1f} | {r.saved_activation_bytes / MB:.1f} | {r.peak_rss / MB:.0f} | "
            f"{r.peak_increase / MB:.0f} | {r.step_seconds:.2f} |")
    note = (
        f"\n{args.steps} training steps (forward, backward, {rows[0].optimizer} step) per model on random input "
        f"{batch} x {frames} frames x {feat_dim} mel features (no frontend), {args.text_len} tokens, "
        f"vocabulary {args.vocab}; "
        f"input shape from {source}; {args.threads} thread(s); each model in a fresh process. "
        "params+grads+Adam and saved activations are exact byte counts; peak RSS is "
        "`getrusage(RUSAGE_SELF).ru_maxrss` (includes the interpreter, libraries and allocator slack; the "
        "next column subtracts the RSS measured right after the imports). Executed depth 'N+n' = the joint "
        "model runs the unfolded depth N and the seed depth n every step.\n"
    )
    text = "\n".join(lines) + "\n" + note
    print(text)
    out = exp_dir / "benchmarks"
    atomic_write_text(out / f"foldable_memory{'' if args.preset == 'tiny' else '_' + args.preset}.md", text)
    atomic_write_text(out / f"foldable_memory{'' if args.preset == 'tiny' else '_' + args.preset}.json", json.dumps({
        "preset": args.preset, "steps": args.steps, "batch": batch, "frames": frames, "feat_dim": feat_dim,
        "text_len": args.text_len,
        "vocab": args.vocab, "threads": args.threads, "input_shape_source": source,
        "rows": [dict(dataclasses.asdict(r), training_state_bytes=r.training_state_bytes,
                      peak_increase=r.peak_increase) for r in rows],
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
