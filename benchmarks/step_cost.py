"""Cost of one training step: one multi-system pass vs the separate models it replaces.

Builds every model from its tiny training config through ``ASRTask`` (the stock build path) and
times forward + backward + Adam step on one fixed synthetic batch of the corpus's shape (15
utterances of 2 s: what ``batch_bins`` gives on spoken_commands), all in one process, one thread,
models interleaved round by round so that drifts in machine load hit every model alike. Reports
the median step time per model and the ratios a user cares about:

* nested: sum of the four twins' steps / one all-in-one step, with ``share_computation`` on and
  off, for ``sampling: all`` and for the sampled variant (``random``, one extra system per step);
* foldable: 2-block seed trained alone + 4-block model trained alone vs one joint step, for both
  repeat orders (``cycle`` makes the seed a prefix of its unfolding, so it is nearly free).

This isolates the per-step cost from everything a full training adds (data loading, validation,
checkpoints); ``nested_supernet.py`` measures whole trainings.

Usage::

    .venv/bin/python benchmarks/step_cost.py [--rounds 12] [--out exp/tiny/benchmarks/step_cost.md]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from espnet_compress.pipeline.tiny import CONF_DIR  # noqa: E402
from espnet_compress.utils.io import atomic_write_text  # noqa: E402

#: label -> (config, model_conf overrides, encoder_conf overrides)
MODELS: Dict[str, Tuple[str, Dict, Dict]] = {
    "conformer (twin of full)": ("train_asr_conformer_tiny.yaml", {}, {}),
    "depth3 twin": ("train_asr_conformer_tiny_depth3.yaml", {}, {}),
    "ffn192 twin": ("train_asr_conformer_tiny_ffn192.yaml", {}, {}),
    "int4 twin": ("train_asr_quantized_conformer_tiny_4bit_scratch.yaml", {}, {}),
    "nested all, no sharing": ("train_asr_nested_conformer_tiny.yaml", {"share_computation": False}, {}),
    "nested all": ("train_asr_nested_conformer_tiny.yaml", {}, {}),
    "nested random1": ("train_asr_nested_conformer_tiny_random1.yaml", {}, {}),
    "seed2 alone": ("train_asr_conformer_tiny_2blocks.yaml", {}, {}),
    "joint in_place": ("train_asr_foldable_conformer_tiny.yaml", {}, {}),
    "joint in_place, no sharing": ("train_asr_foldable_conformer_tiny.yaml", {"share_computation": False}, {}),
    "joint cycle": ("train_asr_foldable_conformer_tiny.yaml", {}, {"fold": {"depth": 4, "order": "cycle"}}),
}
TWINS = ("conformer (twin of full)", "depth3 twin", "ffn192 twin", "int4 twin")


def build(config: Path, model_conf: Dict, encoder_conf: Dict, token_list: Path) -> torch.nn.Module:
    from espnet2.tasks.asr import ASRTask

    parser = ASRTask.get_parser()
    args = parser.parse_args(["--config", str(config), "--token_list", str(token_list), "--token_type", "word"])
    args.normalize = None  # global_mvn needs corpus stats; one elementwise op, the same for every model
    args.model_conf = {**args.model_conf, **model_conf}
    args.encoder_conf = {**args.encoder_conf, **encoder_conf}
    torch.manual_seed(0)
    return ASRTask.build_model(args).train()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12, help="timed steps per model (after 2 untimed)")
    p.add_argument("--out", type=Path, default=Path("exp/tiny/benchmarks/step_cost.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    token_list = tmp / "tokens.txt"
    token_list.write_text("\n".join(["<blank>", "<unk>", *(f"w{i}" for i in range(60)), "<sos/eos>"]) + "\n")
    models = {name: build(CONF_DIR / cfg, mc, ec, token_list) for name, (cfg, mc, ec) in MODELS.items()}
    optims = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}
    g = torch.Generator().manual_seed(1)
    batch = dict(speech=torch.randn(15, 32000, generator=g), speech_lengths=torch.full((15,), 32000),
                 text=torch.randint(2, 60, (15, 6), generator=g), text_lengths=torch.full((15,), 6))

    def step(name: str) -> float:
        start = time.perf_counter()
        optims[name].zero_grad()
        loss, _, _ = models[name](**batch)
        loss.backward()
        optims[name].step()
        return time.perf_counter() - start

    times: Dict[str, List[float]] = {name: [] for name in models}
    for r in tqdm(range(args.rounds + 2), desc="rounds", unit="round"):
        for name in models:
            t = step(name)
            if r >= 2:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    twins = sum(med[t] for t in TWINS)
    separate_fold = med["seed2 alone"] + med["conformer (twin of full)"]
    lines = [
        "## Training step cost: one multi-system step vs separate models",
        "",
        f"Median of {args.rounds} steps (forward + backward + Adam) per model, 1 thread, one synthetic batch "
        "of 15 x 2 s utterances, models interleaved per round.",
        "",
        "| model | ms / step |",
        "|---|---:|",
        *[f"| {name} | {1000 * med[name]:.0f} |" for name in models],
        "",
        "| comparison | ratio |",
        "|---|---:|",
        f"| 4 nested twins / one all-in-one step (sampling all, sharing) | {twins / med['nested all']:.2f}x |",
        f"| 4 nested twins / one all-in-one step (sampling all, no sharing) | {twins / med['nested all, no sharing']:.2f}x |",
        f"| 4 nested twins / one all-in-one step (random, 1 extra system) | {twins / med['nested random1']:.2f}x |",
        f"| sharing saves on the all-systems step | {1 - med['nested all'] / med['nested all, no sharing']:.0%} |",
        f"| seed alone + 4-block alone / one joint step (in_place) | {separate_fold / med['joint in_place']:.2f}x |",
        f"| seed alone + 4-block alone / one joint step (cycle) | {separate_fold / med['joint cycle']:.2f}x |",
        f"| sharing saves on the in_place joint step | {1 - med['joint in_place'] / med['joint in_place, no sharing']:.0%} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"median_seconds": med, "rounds": args.rounds},
                                                                 indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
