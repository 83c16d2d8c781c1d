"""The one rule by which every tool of this project counts a model's parameters.

**Parameters = every parameter of the model, trainable or frozen, each shared (tied) tensor once;
no buffers.** It is the number ESPnet's own model summary prints at training time
(``sum(p.numel() for p in model.parameters())``). Buffers are state, not learned weights: BatchNorm
statistics, quantizer state, positional tables; counting them made the same model read 1,234,390
in one tool and 1,223,258 in another.

A checkpoint file alone cannot tell parameters from buffers, so a file is counted on the model its
training config builds: the ``config.yaml`` beside it (asr.sh's experiment dirs and every export of
this project keep one there).

torch and ESPnet are imported only when a file is counted, so the scoring tools that show
:data:`PARAMETER_RULE` stay importable with the standard library alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import torch

PathLike = Union[str, Path]

#: One sentence for tables and model cards.
PARAMETER_RULE = ("parameters: every parameter of the model (trainable and frozen, tied tensors once), "
                  "no buffers; the count ESPnet's model summary prints")


class ParameterCountError(ValueError):
    """A model file whose parameters cannot be counted; the message names the file and the fix."""


def count_parameters(model: "torch.nn.Module") -> int:
    """Parameters of ``model`` under :data:`PARAMETER_RULE` (``Module.parameters`` yields tied
    tensors once)."""
    return sum(p.numel() for p in model.parameters())


def count_file_parameters(model_file: PathLike, config: Optional[PathLike] = None) -> int:
    """Parameters of the model stored in ``model_file`` (plain, ESPnet-averaged or packed).

    The model is built from ``config`` (default: ``config.yaml`` beside ``model_file``) without
    loading weights, then the file's entries are checked to cover every parameter name, so a
    config that does not belong to the file is refused instead of counted.

    Raises:
        ParameterCountError: no config, or the file does not hold the config's model.
    """
    import argparse

    import torch
    import yaml
    from espnet2.tasks.asr import ASRTask

    from espnet_compress.quant.packed import MAGIC, is_packed
    from espnet_compress.registry import register

    model_file = Path(model_file)
    config = Path(config) if config is not None else model_file.parent / "config.yaml"
    if not config.is_file():
        raise ParameterCountError(
            f"{model_file}: no training config at {config}; parameters are counted on the model the config "
            f"builds (buffers are not parameters), so keep the config.yaml that asr.sh / the export wrote "
            f"beside the model file")
    register()  # idempotent; needed when the import hook is disabled
    with config.open(encoding="utf-8") as f:
        conf = yaml.safe_load(f)
    # Feature normalisation holds buffers only; building it would read its statistics file, whose
    # path in the config is relative to the recipe dir, for nothing the count needs.
    conf["normalize"] = None
    model = ASRTask.build_model(argparse.Namespace(**conf))
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    if is_packed(state):
        import json

        names = {rec["name"] for rec in json.loads(state[MAGIC])["tensors"]}
    else:
        names = set(model_state(state))
    missing = sorted(n for n, _ in model.named_parameters() if n not in names)
    if missing:
        raise ParameterCountError(
            f"{model_file} does not hold the model built from {config}: {len(missing)} parameters missing, "
            f"e.g. {missing[:3]}; give the config the file was trained or exported with")
    return count_parameters(model)


def model_state(loaded: Any) -> Any:
    """The model's state in what ``torch.load`` returned: ESPnet's ``checkpoint.pth`` (for
    ``--resume``) holds it under ``model`` beside the optimiser's; a model file is the state itself."""
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        return loaded["model"]
    return loaded
