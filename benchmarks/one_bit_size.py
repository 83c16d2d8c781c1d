"""Packed bytes of the one- and two-bit systems at the paper's model size (no training).

The tiny corpus's model (d 96) keeps a large share of its bytes in what the method leaves in float
(the Conv2d subsampling, biases, norms), so its byte ratios say little about the Switchboard
Conformer the one-bit ASR paper compresses. Bytes do not depend on the weights' values, so this
builds the recipe's model (``conf/swbd/train_asr_one_bit_cotrain.yaml``: 12 blocks, d 256, FFN
2048, 6 decoder blocks, BPE 2000) with random weights, writes it as ``asr_train`` would (config.yaml
+ state dict), exports every system through the same ``export_system`` path a trained model takes,
and compares with the fp32 baseline (``train_asr_conformer.yaml``) built the same way. Rows:

* ``bit2`` / ``mix15`` / ``bit1``: the systems as co-trained (conv module 4-bit, decoder 4-bit;
  ``mix15`` = the first half of the blocks 1-bit);
* ``bit1_fp_decoder``: 1-bit with the decoder in float (the authors' released config);
* ``bit1_conv1``: the conv modules at 1 bit too (the authors report that low-bit convs degrade);
* ``bit1_front4[_conv1]``: a variant of the config that also quantizes the Conv2d subsampling (4-bit),
  token embedding and CTC projection (decoder bits): only biases and norms stay in float;
* ``bit1_all``: the same variant with the subsampling and conv modules at 1 bit too (the layout of
  ``one_bit.py --all_1bit``, whose WER is measured on the tiny corpus);
* ``bit1_all_fc``: ``bit1_all`` with the subsampling's first convolution (one input channel) in
  float (``one_bit.py --all_1bit --float_first_conv``).

Only the co-trained layout's and ``bit1_all``'s WER are measured (on the tiny corpus,
``benchmarks/one_bit.py``); the other rows are what the bytes would be.

Usage::

    .venv/bin/python benchmarks/one_bit_size.py --out exp/one_bit_size

Outputs ``<out>/one_bit_size.{md,json}``; restartable (exports are reused).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from nested_supernet import save_report  # noqa: E402
from one_bit import (  # noqa: E402
    ALL_ONE_BIT,
    FLOAT_FIRST_CONV,
    blocks_prefix,
    export_co_trained,
    fp32_sizes,
    mix_plan,
    packed_sizes,
    whole_model_variant,
)

from espnet_compress.utils.io import atomic_write_bytes, atomic_write_text  # noqa: E402

log = logging.getLogger("one_bit_size")
CONF = REPO / "conf" / "swbd"
#: exported beyond the co-trained systems: (name, plan bits rules, decoder bits, whole-model variant)
EXTRA_PLANS: Tuple[Tuple[str, Dict[str, int], int, bool], ...] = (
    ("bit1_fp_decoder", {"encoders.*.conv_module.*": 4, "*": 1}, 0, False),
    ("bit1_conv1", {"*": 1}, 4, False),
    ("bit1_front4", {"embed.*": 4, "encoders.*.conv_module.*": 4, "*": 1}, 4, True),
    ("bit1_front4_conv1", {"embed.*": 4, "*": 1}, 4, True),
    ("bit1_all", ALL_ONE_BIT, 4, True),
    ("bit1_all_fc", {**{name: 0 for name in FLOAT_FIRST_CONV}, **ALL_ONE_BIT}, 4, True),
)


def random_checkpoint(config: Path, vocab: int, out: Path) -> Tuple[Path, Path]:
    """``config.yaml`` and ``model.pth`` of ``config``'s model with random weights, as ``asr_train``
    writes them (its own parser and dump), so the export path is the one a trained model takes."""
    from espnet2.tasks.asr import ASRTask
    from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

    conf_file, model_file = out / "config.yaml", out / "model.pth"
    if model_file.exists():
        return conf_file, model_file
    tokens = out / "tokens.txt"
    atomic_write_text(tokens, "\n".join(["<blank>", "<unk>", *[f"t{i}" for i in range(vocab - 3)], "<sos/eos>"]) + "\n")
    args = ASRTask.get_parser().parse_args(["--config", str(config), "--token_list", str(tokens)])
    args.normalize = None  # global_mvn needs corpus statistics; 2 x 80 floats either way
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    args.token_list = str(tokens)
    atomic_write_text(conf_file, yaml_no_alias_safe_dump(vars(args), indent=4, sort_keys=False))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(model_file, buf.getvalue())
    return conf_file, model_file


def vocab_size(value: str) -> int:
    """argparse type of ``--vocab``: <blank>, <unk> and <sos/eos> plus at least one token."""
    size = int(value)
    if size < 4:
        raise argparse.ArgumentTypeError(f"a token list needs <blank>, <unk>, <sos/eos> and a token: >= 4, got {size}")
    return size


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("exp/one_bit_size"))
    p.add_argument("--config", type=Path, default=CONF / "train_asr_one_bit_cotrain.yaml")
    p.add_argument("--fp32_config", type=Path, default=CONF / "train_asr_conformer.yaml")
    p.add_argument("--vocab", type=vocab_size, default=2000, help="token list size (the recipe's BPE 2000)")
    p.add_argument("--ternary_packing", choices=("bits", "trits"), default="trits")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from espnet_compress.export.system_export import export_system

    out = args.out.resolve()
    fp32_conf, fp32_file = random_checkpoint(args.fp32_config.resolve(), args.vocab, out / "fp32")
    config, model_file = random_checkpoint(args.config.resolve(), args.vocab, out / "co_trained")
    prefix = blocks_prefix(config)
    fp32_enc, fp32_blk = fp32_sizes(fp32_file, prefix)
    files = export_co_trained(config, model_file, out / "systems", ["bit2", "bit1"], mix_plan(config, model_file), 4,
                              args.ternary_packing)
    whole_config, whole_file = random_checkpoint(whole_model_variant(args.config.resolve(), out / "variant"),
                                                 args.vocab, out / "co_trained_whole")
    for name, bits, decoder_bits, whole in tqdm(EXTRA_PLANS, desc="export", unit="system"):
        done = out / "systems" / name / "export.json"
        if not done.exists():
            src_config, src_file = (whole_config, whole_file) if whole else (config, model_file)
            res = export_system(src_config, src_file, None, done.parent, plan={"name": name, "bits": bits},
                                plan_decoder_bits=decoder_bits, ternary_packing=args.ternary_packing)
            atomic_write_text(done, json.dumps({"model_file": str(res.model_file)}) + "\n")
        files[name] = Path(json.loads(done.read_text())["model_file"])

    rows: List[Dict[str, Any]] = [{"system": "fp32", "file": fp32_file.stat().st_size, "encoder": fp32_enc,
                                   "blocks": fp32_blk, "by_width": {"fp32": fp32_enc}}]
    for name in ("bit2", "mix15", "bit1", *[e[0] for e in EXTRA_PLANS]):
        enc, blk, by_width = packed_sizes(files[name], prefix)
        rows.append({"system": name, "file": files[name].stat().st_size, "encoder": enc, "blocks": blk,
                     "by_width": by_width})
    base = rows[0]
    lines = [f"# One- and two-bit systems at the paper's size ({args.config.name}, random weights)", "",
             f"Vocabulary {args.vocab}; 2-bit codes packed as {args.ternary_packing}. Ratios against the fp32 "
             f"baseline ({args.fp32_config.name}) built the same way.", "",
             "| system | Conformer blocks bytes | x | encoder bytes | x | whole file bytes | x | encoder by stored width |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        widths = ", ".join(f"{k} {v:,}" for k, v in r["by_width"].items())
        lines.append(f"| {r['system']} | {r['blocks']:,} | {base['blocks'] / r['blocks']:.1f} | {r['encoder']:,} | "
                     f"{base['encoder'] / r['encoder']:.1f} | {r['file']:,} | {base['file'] / r['file']:.1f} | {widths} |")
    save_report(out, "one_bit_size", lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
