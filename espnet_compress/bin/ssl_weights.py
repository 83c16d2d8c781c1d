"""Save a torchaudio wav2vec2 / HuBERT model's weights as a local file for ``pretrained_path``.

The SSL encoders (``elastic_wav2vec2``, ``foldable_wav2vec2``, ...) never download anything: they
load a local state dict. Run this once where torchaudio's model store is reachable, then copy the
file to the training machine::

    python -m espnet_compress.bin.ssl_weights --bundle HUBERT_BASE --out downloads/hubert_base.pth

It prints the ``encoder_conf`` options that describe the bundle's network (the encoder's defaults
are the base models'; large models need the printed options).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from espnet_compress.utils.io import atomic_write_bytes


def ssl_bundles() -> Dict[str, object]:
    """torchaudio's pretrained (not ASR fine-tuned) wav2vec2-architecture bundles by name."""
    import torchaudio.pipelines as pipelines
    from torchaudio.pipelines import Wav2Vec2ASRBundle, Wav2Vec2Bundle

    found = {}
    for name in dir(pipelines):
        bundle = getattr(pipelines, name)
        if isinstance(bundle, Wav2Vec2Bundle) and not isinstance(bundle, Wav2Vec2ASRBundle):
            params = getattr(bundle, "_params", {})
            if params.get("extractor_mode") and "encoder_num_buckets" not in params:  # WavLM differs
                found[name] = bundle
    return found


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="torchaudio.pipelines name, e.g. HUBERT_BASE, WAV2VEC2_BASE")
    p.add_argument("--out", type=Path, required=True, help="state dict file to write (.pth)")
    args = p.parse_args(argv)
    bundles = ssl_bundles()
    if args.bundle not in bundles:
        print(f"ssl_weights: unknown bundle '{args.bundle}'; choose one of {sorted(bundles)}", file=sys.stderr)
        return 2
    bundle = bundles[args.bundle]
    try:
        model = bundle.get_model()
    except Exception as err:  # noqa: BLE001 - urllib, torch.hub and OS errors all mean 'not fetched'
        print(f"ssl_weights: could not fetch {args.bundle} ({type(err).__name__}: {err}); run this where "
              f"torchaudio's model store is reachable and copy {args.out.name} here", file=sys.stderr)
        return 2
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(args.out, buf.getvalue())
    options = {k: [list(c) for c in v] if k == "extractor_conv_layer_config" else v
               for k, v in bundle._params.items() if k.startswith(("extractor_", "encoder_"))}
    options["pretrained_path"] = str(args.out)
    print(yaml.safe_dump({"encoder_conf": options}, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
