"""Export a quantization-aware ESPnet ASR checkpoint as a packed low-bit model for deployment.

The output directory holds everything stock ESPnet inference needs, and nothing of the training run:

* ``model.packed.pth``: the weights at their trained bit widths (:mod:`espnet_compress.quant.packed`);
  for a nested supernet whose quantizers are all bit planes (``method: bitplane``), the widest
  width's codes, from which every system's narrower codes are sliced at load: one file for all
  systems (``ESPNET_COMPRESS_SYSTEM`` picks one, as for the fp32 checkpoint);
* ``config.yaml``: the training config with ``model: compressed`` (a stock ``espnet`` model is
  rewritten to it: same options, plus the load hook that expands packed checkpoints) and the files
  inference reads (token list, BPE model, feature statistics) copied next to it and referenced by
  absolute path, so ``Speech2Text(asr_train_config=..., asr_model_file=...)`` works from any cwd;
* ``size_report.json`` / ``size_report.md``: where the bytes go and the compression ratios;
* ``model.packed.zip``: the same files as an ESPnet model-zoo archive (``espnet2`` ``pack``), whose
  members are relative so ``Speech2Text.from_pretrained`` / ``ModelDownloader`` unpack it anywhere.

Everything is written into a staging directory first and moved in only when complete, so an
interrupted export never leaves a half-written model behind.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
import yaml

from espnet_compress.quant.api import quantized_modules
from espnet_compress.quant.bitpack import PACKINGS
from espnet_compress.quant.packed import _FLOAT_DTYPES, is_packed, save_packed, size_report, stores_planes

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
KeyPath = Tuple[str, ...]

PACKED_NAME = "model.packed.pth"
CONFIG_NAME = "config.yaml"
REPORT_JSON_NAME = "size_report.json"
REPORT_MD_NAME = "size_report.md"
ARCHIVE_NAME = "model.packed.zip"

#: ``model`` values of a training config the export accepts, and what the exported config says.
#: Only these build :class:`~espnet_compress.models.compressed_asr.CompressedASRModel`, whose load
#: hook turns a packed file back into weights; any other model class would load nothing from it.
MODEL_REWRITE: Dict[str, str] = {"espnet": "compressed", "compressed": "compressed"}


class ExportError(ValueError):
    """An export that cannot be made; the message names the file or option at fault."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Paths of the exported files and the size report (also in ``size_report.json``)."""

    out_dir: Path
    packed_file: Path
    config_file: Path
    size_report_json: Path
    size_report_md: Path
    archive: Path
    report: Dict[str, Any]


def export_packed(config: PathLike, model_file: PathLike, out_dir: PathLike, fp_dtype: str = "float32",
                  scale_dtype: str = "float32", ternary_packing: str = "bits") -> ExportResult:
    """Pack the model of ``config`` + ``model_file`` (a QAT checkpoint) into ``out_dir``.

    Args:
        config: the training ``config.yaml`` (paths in it are relative to the recipe directory,
            as everywhere in ESPnet).
        model_file: the trained checkpoint, e.g. ``valid.acc.best.pth``.
        out_dir: created if needed; existing files of a previous export are replaced.
        fp_dtype: storage dtype of tensors that are not quantized (``float32`` keeps them exact).
        scale_dtype: storage dtype of quantization scales (and LSQ steps).
        ternary_packing: layout of 2-bit (ternary) codes: ``bits`` (2 bits each) or ``trits``
            (five per byte, 1.6 bits each; needs this version of the loader).

    Raises:
        ExportError: a missing/unsuitable input, or a model without any quantized layer.
    """
    config, model_file = Path(config), Path(model_file)
    out_dir = Path(out_dir).resolve()
    for option, path in (("asr_train_config", config), ("asr_model_file", model_file)):
        if not path.is_file():
            raise ExportError(f"{option} {path}: no such file")
    for option, value in (("fp_dtype", fp_dtype), ("scale_dtype", scale_dtype)):
        if value not in _FLOAT_DTYPES:
            raise ExportError(f"{option} must be one of {sorted(_FLOAT_DTYPES)}, got {value!r}")
    if ternary_packing not in PACKINGS:
        raise ExportError(f"ternary_packing must be one of {list(PACKINGS)}, got {ternary_packing!r}")
    train_conf = _read_config(config)
    model_name = train_conf.get("model", "espnet")
    if model_name not in MODEL_REWRITE:
        raise ExportError(
            f"{config}: model '{model_name}' cannot load packed checkpoints; export a model trained "
            f"as {sorted(MODEL_REWRITE)} ('espnet' is exported as 'compressed')"
        )
    aux_files = _auxiliary_files(train_conf, config)
    model = _build_model(config, model_file)
    plane_systems = bit_plane_systems(model, config)  # first: names a system left in full precision
    if not any(m.bits for m in quantized_modules(model).values()):
        raise ExportError(
            f"{model_file}: the model built from {config} has no quantized layer (encoder "
            f"'{train_conf.get('encoder')}', model_conf.decoder_quant "
            f"{(train_conf.get('model_conf') or {}).get('decoder_quant')}); a packed export needs a "
            f"QAT model, e.g. encoder quantized_conformer or model_conf.decoder_quant"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".export"))
    try:
        header = save_packed(model, stage / PACKED_NAME, fp_dtype=fp_dtype, scale_dtype=scale_dtype,
                             ternary_packing=ternary_packing, planes=bool(plane_systems))
        report = size_summary(header, model_file.stat().st_size, (stage / PACKED_NAME).stat().st_size)
        report.update(source_config=str(config.resolve()), source_model_file=str(model_file.resolve()),
                      fp_dtype=fp_dtype, bit_plane_systems=plane_systems)
        (stage / REPORT_JSON_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (stage / REPORT_MD_NAME).write_text(size_markdown(report, out_dir.name), encoding="utf-8")

        aux: Dict[KeyPath, str] = {}  # config entry -> name of its copy in out_dir
        for (key, path), name in zip(aux_files, _unique_names([path for _, path in aux_files]), strict=True):
            shutil.copyfile(path, stage / name)
            aux[key] = name
        deploy_conf = _with_values(train_conf, {("model",): MODEL_REWRITE[model_name]})
        local_conf = _with_values(deploy_conf, {key: str(out_dir / name) for key, name in aux.items()})
        (stage / CONFIG_NAME).write_text(_dump_yaml(local_conf), encoding="utf-8")
        # save_packed writes through a private temp file (mode 0600); give the deployed model the
        # permissions every other exported file gets from the umask.
        shutil.copymode(stage / CONFIG_NAME, stage / PACKED_NAME)
        _make_archive(stage, out_dir.name or "model", deploy_conf, aux)

        # Config last: once the new config.yaml is visible, every file it refers to is in place.
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in [*aux.values(), PACKED_NAME, REPORT_JSON_NAME, REPORT_MD_NAME, ARCHIVE_NAME, CONFIG_NAME]:
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("exported %s (%d bytes, %.2fx smaller than %s) to %s", PACKED_NAME, report["packed_file_bytes"],
             report["ratio_overall"], model_file, out_dir)
    return ExportResult(out_dir=out_dir, packed_file=out_dir / PACKED_NAME, config_file=out_dir / CONFIG_NAME,
                        size_report_json=out_dir / REPORT_JSON_NAME, size_report_md=out_dir / REPORT_MD_NAME,
                        archive=out_dir / ARCHIVE_NAME, report=report)


def bit_plane_systems(model: torch.nn.Module, config: Path) -> List[str]:
    """The systems one packed file of ``model`` decodes: all of them when ``model`` is a
    multi-system model whose every quantized layer stores bit planes, else none (the file holds
    the active system only). A bit-plane file holds no fp weight, so a system running a quantized
    layer in full precision is refused by name: give it bits, or export it with ``export_system``."""
    systems = list(getattr(model, "systems", None) or {})
    qmods = quantized_modules(model)
    if not systems or not all(stores_planes(m) for m in qmods.values()):
        return []
    active = model.active_system
    try:
        for name in systems:
            model.use_system(name)
            fp = [n for n, m in quantized_modules(model).items() if not m.bits]
            if fp:
                raise ExportError(
                    f"{config}: model_conf.systems.{name} runs '{fp[0]}' in full precision, but a bit-plane "
                    f"file holds {qmods[fp[0]].weight_quantizer.master_bits}-bit codes only; set the system's "
                    f"bits/decoder_bits, or export it on its own with export_system"
                )
    finally:
        model.use_system(active)
    return systems


# ---------------------------------------------------------------------------------- size report
def size_summary(header: Mapping[str, Any], source_bytes: int, packed_file_bytes: int) -> Dict[str, Any]:
    """Byte accounting of a packed file against its fp32 source checkpoint.

    The overall ratio compares whole files (so container overhead and the full-precision tensors
    count); the quantized-weights ratio compares the packed codes + scales with the same weights at
    fp32, which is what the bit width alone buys (about 32/n for large tensors).
    """
    quantized = [r for r in header["tensors"] if r["bits"]]
    histogram: Dict[str, Dict[str, int]] = {}
    for rec in sorted(quantized, key=lambda r: r["bits"]):
        entry = histogram.setdefault(str(rec["bits"]), {"tensors": 0, "params": 0, "packed_bytes": 0})
        entry["tensors"] += 1
        entry["params"] += _numel(rec["shape"])
        entry["packed_bytes"] += rec["nbytes"]
    q_params = sum(e["params"] for e in histogram.values())
    q_packed = sum(e["packed_bytes"] for e in histogram.values())
    return {
        "source_checkpoint_bytes": source_bytes,
        "packed_file_bytes": packed_file_bytes,
        "ratio_overall": source_bytes / packed_file_bytes,
        "blob_bytes": header["blob_bytes"],
        "container_overhead_bytes": packed_file_bytes - header["blob_bytes"],
        "groups": size_report(header),
        "tensor_groups": tensor_groups(header),
        "quantized_weights": {
            "tensors": len(quantized),
            "params": q_params,
            "fp32_bytes": 4 * q_params,
            "packed_bytes": q_packed,
            "ratio": 4 * q_params / q_packed if q_packed else 0.0,
        },
        "bits_histogram": histogram,
        "scale_dtype": header["scale_dtype"],
    }


#: size-report groups, in report order: (group, state-dict name prefixes); full-precision biases and
#: norms go to NORMS_GROUP whatever their prefix, anything unmatched to "other"
TENSOR_GROUPS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("front end", ("encoder.embed.",)),
    ("encoder blocks", ("encoder.encoders.",)),
    ("decoder blocks", ("decoder.decoders.",)),
    ("embedding", ("decoder.embed.",)),
    ("output layer", ("decoder.output_layer.",)),
    ("ctc", ("ctc.",)),
)
NORMS_GROUP = "norms/biases"


def tensor_group(name: str, bits: int) -> str:
    """The size-report group of one state-dict entry (see :data:`TENSOR_GROUPS`)."""
    leaf = name.rsplit(".", 1)[-1]
    if not bits and (leaf == "bias" or "norm" in name):
        return NORMS_GROUP
    return next((g for g, prefixes in TENSOR_GROUPS if name.startswith(prefixes)), "other")


def tensor_groups(header: Mapping[str, Any]) -> Dict[str, Dict[str, int]]:
    """Bytes, tensors and quantized tensors per :func:`tensor_group`, every group listed (0 if empty),
    so a layer left in fp32 shows up as bytes where codes were expected."""
    out = {g: {"tensors": 0, "quantized": 0, "bytes": 0} for g in [*(g for g, _ in TENSOR_GROUPS), NORMS_GROUP, "other"]}
    for rec in header["tensors"]:
        entry = out[tensor_group(rec["name"], rec["bits"])]
        entry["tensors"] += 1
        entry["quantized"] += int(bool(rec["bits"]))
        entry["bytes"] += rec["nbytes"]
    return out


def size_markdown(report: Mapping[str, Any], title: str) -> str:
    """Human-readable form of :func:`size_summary` (``size_report.md``)."""
    qw = report["quantized_weights"]
    lines = [
        f"# Packed model size: {title}",
        "",
        f"- source checkpoint (fp32): {report['source_checkpoint_bytes']:,} bytes",
        f"- packed file: {report['packed_file_bytes']:,} bytes "
        f"(payload {report['blob_bytes']:,} + container {report['container_overhead_bytes']:,})",
        f"- overall ratio fp32 / packed: **{report['ratio_overall']:.2f}x**",
        *([f"- bit planes: this one file decodes systems {', '.join(report['bit_plane_systems'])} "
           f"(ESPNET_COMPRESS_SYSTEM=<name>)"] if report.get("bit_plane_systems") else []),
        f"- quantized weights: {qw['params']:,} params in {qw['tensors']} tensors, "
        f"{qw['fp32_bytes']:,} bytes at fp32 -> {qw['packed_bytes']:,} bytes packed (codes + scales): "
        f"**{qw['ratio']:.2f}x**",
        "",
        "| tensor group | tensors | quantized | bytes | share of payload |",
        "|---|---:|---:|---:|---:|",
        *(f"| {group} | {e['tensors']} | {e['quantized']} | {e['bytes']:,} | "
          f"{e['bytes'] / max(report['blob_bytes'], 1):.1%} |"
          for group, e in report.get("tensor_groups", {}).items()),
        "",
        "| stored as | bytes |",
        "|---|---:|",
        *(f"| {group} | {nbytes:,} |" for group, nbytes in report["groups"].items()),
        "",
        "| bits | tensors | params | packed bytes |",
        "|---:|---:|---:|---:|",
        *(f"| {bits} | {e['tensors']} | {e['params']:,} | {e['packed_bytes']:,} |"
          for bits, e in report["bits_histogram"].items()),
        "",
    ]
    return "\n".join(lines)


def _numel(shape: List[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------------------------- model
def _build_model(config: Path, model_file: Path) -> torch.nn.Module:
    """Build with ESPnet's own loader, then check the checkpoint really covered the model:
    ``build_model_from_file`` loads with ``strict=False``, so a mismatched checkpoint would
    otherwise be exported with randomly initialised weights."""
    from espnet2.tasks.asr import ASRTask

    from espnet_compress.registry import register

    register()  # idempotent; needed when the import hook is disabled (ESPNET_COMPRESS_NO_HOOK=1)
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for damaged or foreign files
        raise ExportError(f"{model_file}: cannot read the checkpoint ({err})") from None
    if isinstance(state, Mapping) and "module" in state:  # DeepSpeed layout, as ESPnet accepts it
        state = state["module"]
    if is_packed(state):
        raise ExportError(f"{model_file} is already a packed checkpoint; export the QAT checkpoint it was made from")
    if not isinstance(state, Mapping):
        raise ExportError(f"{model_file}: expected a state dict, got {type(state).__name__}")
    model, _ = ASRTask.build_model_from_file(config, model_file, "cpu")
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ExportError(
            f"{model_file} does not match the model built from {config}: {len(missing)} missing "
            f"entries, e.g. {missing[:5]}"
        )
    return model.eval()


# ---------------------------------------------------------------------------------- config
def _read_config(config: Path) -> Dict[str, Any]:
    with config.open(encoding="utf-8") as f:
        conf = yaml.safe_load(f)
    if not isinstance(conf, dict):
        raise ExportError(f"{config}: expected an ESPnet training config (a YAML mapping)")
    return conf


def _auxiliary_files(conf: Mapping[str, Any], config: Path) -> List[Tuple[KeyPath, Path]]:
    """Files named in the config that building the model for inference reads: token list (when
    given as a file), BPE model and the ``stats_file`` of any ``*_conf`` (global MVN statistics)."""
    keys: List[KeyPath] = [("token_list",), ("bpemodel",)]
    keys += [(k, "stats_file") for k, v in conf.items() if k.endswith("_conf") and isinstance(v, Mapping)
             and "stats_file" in v]
    found = []
    for key in keys:
        value: Any = conf
        for part in key:
            value = value.get(part) if isinstance(value, Mapping) else None
        if not isinstance(value, str):
            continue
        path = Path(value)
        if not path.is_file():
            raise ExportError(
                f"{config}: {'.'.join(key)} points to {value}, which does not exist (relative paths in "
                f"an ESPnet config are relative to the recipe directory: run the export from there)"
            )
        found.append((key, path))
    return found


def _unique_names(paths: List[Path]) -> List[str]:
    """File names for copies in the export directory, never clashing with each other or ours."""
    used = {PACKED_NAME, CONFIG_NAME, REPORT_JSON_NAME, REPORT_MD_NAME, ARCHIVE_NAME}
    names = []
    for path in paths:
        name, i = path.name, 1
        while name in used:
            name, i = f"{i}_{path.name}", i + 1
        used.add(name)
        names.append(name)
    return names


def _with_values(conf: Mapping[str, Any], values: Mapping[KeyPath, Any]) -> Dict[str, Any]:
    """Deep copy of ``conf`` with the entries at the given key paths replaced."""
    out = copy.deepcopy(dict(conf))
    for key, value in values.items():
        node = out
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = value
    return out


def _dump_yaml(conf: Mapping[str, Any]) -> str:
    from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

    return yaml_no_alias_safe_dump(dict(conf), indent=4, sort_keys=False)


# ---------------------------------------------------------------------------------- archive
def _make_archive(stage: Path, name: str, deploy_conf: Mapping[str, Any], aux: Mapping[KeyPath, str]) -> None:
    """Write ``stage/model.packed.zip`` with ESPnet's ``pack`` (the ``asr.sh`` packing stage).

    ``pack`` names members by their path relative to the working directory, and ``unpack`` rewrites
    config values equal to a member name into the unpacked path. So the archive is made from a
    scratch directory holding ``<name>/{config.yaml, model.packed.pth, ...}`` whose config refers to
    ``<name>/<file>``: members are portable and an unpacked config points at the unpacked files.
    The working directory changes for the duration of the call (``pack`` offers no base directory).
    """
    from espnet2.main_funcs.pack_funcs import pack

    scratch = stage / ".archive"
    root = scratch / name
    root.mkdir(parents=True)
    for filename in [PACKED_NAME, REPORT_MD_NAME, *aux.values()]:
        shutil.copyfile(stage / filename, root / filename)
    conf = _with_values(deploy_conf, {key: f"{name}/{filename}" for key, filename in aux.items()})
    (root / CONFIG_NAME).write_text(_dump_yaml(conf), encoding="utf-8")
    listing = io.StringIO()
    with contextlib.chdir(scratch), contextlib.redirect_stdout(listing):
        pack(
            files={"asr_model_file": f"{name}/{PACKED_NAME}"},
            yaml_files={"asr_train_config": f"{name}/{CONFIG_NAME}"},
            option=[f"{name}/{REPORT_MD_NAME}", *(f"{name}/{f}" for f in aux.values())],
            outpath=str(stage / ARCHIVE_NAME),
        )
    log.debug("pack: %s", listing.getvalue().strip())
    shutil.rmtree(scratch)
