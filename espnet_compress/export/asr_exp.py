"""Exports placed where ESPnet's ``asr.sh`` decodes (stages 12-13) and packs (stage 14) them.

asr.sh decodes and packs ``${asr_exp}/config.yaml`` with ``${asr_exp}/${inference_asr_model}``, and
stage 14 always adds ``${asr_exp}/images`` and ``${asr_exp}/RESULTS.md`` to the zip. So:

* a packed QAT model goes beside the checkpoint it was made from, as
  ``${asr_exp}/<checkpoint stem>.packed.pth``: the training config loads it (model ``compressed``),
  ``--inference_asr_model valid.acc.best.packed.pth`` decodes it under its own inference tag, and
  stage 14 writes ``${asr_exp}/<asr_exp name>_valid.acc.best.packed.zip`` holding the packed file
  instead of the fp32 checkpoint (the full export, with its size report, is in ``${asr_exp}/packed``);
* an exported system has its own network, hence its own config: it gets its own experiment dir
  ``<asr_exp>_<system>`` (``config.yaml``, ``model.pth`` or ``model.packed.pth``, and the training
  curves ``images`` of the model it came from), decoded and packed with
  ``asr.sh --asr_exp <asr_exp>_<system> --inference_asr_model model.pth``.

Each export also writes ``export.json`` (the command, the source experiment, the system) into the
directory it fills, which the model card reads to state how the model was made.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from espnet_compress.export.packed_export import ExportError, ExportResult, export_packed

PathLike = Union[str, Path]

#: What export tools record in the directory they fill (read by :mod:`espnet_compress.export.model_card`).
EXPORT_RECORD = "export.json"
#: asr.sh's default ``--inference_asr_model``.
DEFAULT_MODEL = "valid.acc.best.pth"


@dataclasses.dataclass(frozen=True)
class ExpPacked:
    """A packed model placed in an asr.sh experiment dir."""

    asr_exp: Path
    inference_asr_model: str  # the value of asr.sh's --inference_asr_model
    export: ExportResult


def check_asr_exp(asr_exp: PathLike, model_name: str) -> Path:
    """The checkpoint ``asr_exp/model_name``, after checking everything stage 14 will need from
    training is there (stage 14 fails on a missing ``images`` only after decoding)."""
    asr_exp = Path(asr_exp)
    if Path(model_name).name != model_name:
        raise ExportError(f"--asr_model_file {model_name!r}: give a file name inside {asr_exp}, as asr.sh's "
                          f"--inference_asr_model (asr.sh names the zip after it and cannot pack a sub-path)")
    for path, fix in (
        (asr_exp / "config.yaml", "give the experiment dir asr.sh's stage 11 wrote (exp/asr_<tag>)"),
        (asr_exp / model_name, f"train first, or name an existing checkpoint of {asr_exp}"),
        (asr_exp / "images", "asr.sh stage 14 packs it and asr_train writes it only with use_matplotlib: true "
                             "(every config of this project sets it); retrain with it, or "
                             f"'mkdir {asr_exp / 'images'}' to pack without training curves"),
    ):
        if not path.exists():
            raise ExportError(f"{path} does not exist: {fix}")
    return asr_exp / model_name


def export_packed_to_exp(asr_exp: PathLike, model_name: str = DEFAULT_MODEL, fp_dtype: str = "float32",
                         scale_dtype: str = "float32", command: Optional[Sequence[str]] = None,
                         ternary_packing: str = "bits") -> ExpPacked:
    """Pack ``asr_exp/model_name`` (a QAT checkpoint) and place it for asr.sh (module docstring)."""
    asr_exp = Path(asr_exp)
    model_file = check_asr_exp(asr_exp, model_name)
    config = asr_exp / "config.yaml"
    model_kind = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("model", "espnet")
    if model_kind != "compressed":
        raise ExportError(
            f"{config}: model '{model_kind}' cannot load a packed checkpoint, and asr.sh decodes and packs with "
            f"this config; train with 'model: compressed' (same options as 'espnet', as the QAT configs of this "
            f"project do), or use export_packed --out_dir for a standalone export")
    result = export_packed(config, model_file, asr_exp / "packed", fp_dtype=fp_dtype, scale_dtype=scale_dtype,
                           ternary_packing=ternary_packing)
    name = f"{Path(model_name).stem}.packed.pth"
    shutil.copyfile(result.packed_file, asr_exp / name)
    _record(asr_exp, command, source_asr_exp=asr_exp, model_file=model_file, system=None,
            inference_asr_model=name)
    return ExpPacked(asr_exp, name, result)


def system_exp_dir(asr_exp: PathLike, system: str) -> Path:
    """The experiment dir of an exported system: a sibling of its source, ``<asr_exp>_<system>``."""
    asr_exp = Path(asr_exp)
    return asr_exp.parent / f"{asr_exp.name}_{system}"


def export_systems_to_exp(asr_exp: PathLike, systems: Sequence[str], model_name: str = DEFAULT_MODEL,
                          command: Optional[Sequence[str]] = None) -> List[Any]:
    """Export each of ``systems`` (``["all"]``: every declared system) of the model in ``asr_exp``
    into its own asr.sh experiment dir (:func:`system_exp_dir`); returns the ``SystemExport``\\ s."""
    from espnet_compress.export.system_export import export_system

    asr_exp = Path(asr_exp)
    model_file = check_asr_exp(asr_exp, model_name)
    config = asr_exp / "config.yaml"
    names = declared_systems(config) if list(systems) == ["all"] else list(systems)
    if not names:
        raise ExportError(f"{config}: no model_conf.systems to export")
    results = []
    for name in names:
        out = system_exp_dir(asr_exp, name)
        result = export_system(config, model_file, name, out)
        shutil.copytree(asr_exp / "images", out / "images", dirs_exist_ok=True)
        _record(out, command, source_asr_exp=asr_exp, model_file=model_file, system=name,
                inference_asr_model=result.model_file.name)
        results.append(result)
    return results


def declared_systems(config: PathLike) -> List[str]:
    """Names of ``model_conf.systems`` in a training config, in declaration order (largest first)."""
    conf = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    return list((conf.get("model_conf") or {}).get("systems") or {})


def read_record(directory: PathLike) -> Optional[Dict[str, Any]]:
    """The :data:`EXPORT_RECORD` of ``directory``, or None if it was not filled by an export."""
    path = Path(directory) / EXPORT_RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _record(directory: Path, command: Optional[Sequence[str]], **fields: Any) -> None:
    from espnet_compress.utils.io import atomic_write_text

    """``command`` is the command line a user would retype (the CLIs pass theirs; None from Python);
    paths are stored absolute (links kept: valid.acc.best.pth names the choice), so the record is
    understood from any working directory."""
    record = {"command": None if command is None else list(command),
              **{k: str(v.absolute()) if isinstance(v, Path) else v for k, v in fields.items()}}
    atomic_write_text(directory / EXPORT_RECORD, json.dumps(record, indent=2) + "\n")
