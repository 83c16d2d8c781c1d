"""Export one system of a multi-system model as a standalone ESPnet model.

A system keeps only what it runs: the physical blocks its plan uses (renumbered in order of first
use), each FFN cut to the widest width the plan asks of it, and the decoder at the system's
precision. Then:

* a full-precision system that runs each kept block once at one FFN width is a plain host
  network: for the Conformer it is exported as ESPnet's stock ``conformer`` with model ``espnet``,
  a checkpoint that loads and decodes **without** this plugin;
* any other system (quantized, repeated blocks, per-step widths, or a host without a stock ESPnet
  twin such as wav2vec2) is exported with our encoder and the plan baked in as its default, as a
  packed checkpoint when it is quantized. (Per-step widths keep every kept block at the plan's
  widest width, since the host networks have one FFN size.)
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import yaml

from espnet_compress.core.elastic import ElasticFFN
from espnet_compress.encoders.elastic import ElasticEncoder
from espnet_compress.quant.api import quantized_modules
from espnet_compress.utils.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

_MODEL_ONLY_OPTIONS = ("systems", "largest", "kl_weight", "kl_target", "sampling", "num_random_systems",
                       "sampling_seed", "decode_system")


def _block_key(encoder: torch.nn.Module) -> "re.Pattern[str]":
    """Matches ``encoder.<blocks>.<i>.<rest>`` state-dict keys of the encoder's physical blocks."""
    return re.compile(rf"^encoder\.{re.escape(encoder.blocks_name)}\.(\d+)\.(.*)$")


def _ffn_slices(encoder: torch.nn.Module) -> Tuple["re.Pattern[str]", "re.Pattern[str]"]:
    """Block-relative keys cut by rows (the FFNs' first layer) and by columns (their second)."""
    block = next(encoder.blocks.physical_blocks())
    ffns = [(n, m) for n, m in block.named_children() if isinstance(m, ElasticFFN)]
    names = "|".join(re.escape(n) for n, _ in ffns) or "(?!)"
    first, second = (ffns[0][1].IN, ffns[0][1].OUT) if ffns else ("(?!)", "(?!)")
    return (re.compile(rf"^({names})\.{first}\.(weight|bias)$"), re.compile(rf"^({names})\.{second}\.weight$"))


@dataclasses.dataclass(frozen=True)
class SystemExport:
    """What :func:`export_system` wrote."""

    system: str
    config: Path
    model_file: Path
    stock: bool  # loads without espnet_compress
    packed: bool
    num_params: int


def _layout(model: torch.nn.Module, name: str) -> Tuple[List[int], Dict[int, int], List[int], List[int]]:
    """(kept physical blocks, old->new index, new block index per step, width per step)."""
    spec = model.systems[name]
    kept: List[int] = []
    for b in spec.plan.blocks:
        if b not in kept:
            kept.append(b)
    remap = {old: new for new, old in enumerate(kept)}
    widths = [spec.plan.units_at(i, model.encoder.linear_units) for i in range(spec.plan.depth)]
    return kept, remap, [remap[b] for b in spec.plan.blocks], widths


def system_state_dict(model: torch.nn.Module, name: str) -> Dict[str, torch.Tensor]:
    """The system's weights under standalone names (renumbered blocks, FFNs cut to the widest
    width the plan uses: ESPnet's Conformer gives every block the same ``linear_units``)."""
    kept, remap, steps, widths = _layout(model, name)
    width = max(widths)
    block_key, (by_rows, by_cols) = _block_key(model.encoder), _ffn_slices(model.encoder)
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        m = block_key.match(key)
        if m is None:
            out[key] = value.clone()
            continue
        old, rest = int(m.group(1)), m.group(2)
        if old not in remap:
            continue
        if by_rows.match(rest):
            value = value[:width]
        elif by_cols.match(rest):
            value = value[:, :width]
        out[f"encoder.{model.encoder.blocks_name}.{remap[old]}.{rest}"] = value.clone()
    return out


def system_config(train_config: Dict[str, Any], model: torch.nn.Module, name: str) -> Tuple[Dict[str, Any], bool]:
    """Training config rewritten for the standalone system; second value: is it a stock model."""
    spec, encoder = model.systems[name], model.encoder
    kept, remap, steps, widths = _layout(model, name)
    conf = copy.deepcopy(train_config)
    enc = conf["encoder_conf"]
    for key in encoder.BUILD_ONLY_OPTIONS:  # the plan (and fold path) is baked in below
        enc.pop(key, None)
    blocks_option, units_option = encoder.SHAPE_OPTIONS
    enc[blocks_option] = len(kept)
    enc[units_option] = max(widths)
    uniform = steps == list(range(len(kept))) and len(set(widths)) == 1
    quantized = any(b for _, b in spec.plan.bits) or spec.decoder_bits
    model_conf = {k: v for k, v in conf.get("model_conf", {}).items() if k not in _MODEL_ONLY_OPTIONS}
    model_conf.pop("decoder_quant", None)
    stock = uniform and not quantized and encoder.STOCK_ENCODER is not None
    if stock:
        conf["encoder"], conf["model"] = encoder.STOCK_ENCODER, "espnet"
    else:
        plan: Dict[str, Any] = {"blocks": steps}
        if len(set(widths)) > 1:
            plan["ffn_units"] = widths
        if any(b for _, b in spec.plan.bits):
            enc_q = encoder.quant_config
            block_key = _block_key(encoder)
            rules = {}
            for mod_name in quantized_modules(encoder):
                m = block_key.match(f"encoder.{mod_name}")
                bits = spec.plan.bits_for(mod_name)
                if m is not None:
                    if int(m.group(1)) not in remap:
                        continue
                    mod_name = f"{encoder.block_name(remap[int(m.group(1))])}.{m.group(2)}"
                rules[mod_name] = bits
            enc["quant_conf"] = {"bits": rules, "method": enc_q.method, "per_channel": enc_q.per_channel}
            conf["encoder"] = f"quantized_{encoder.FAMILY}"
        else:
            conf["encoder"] = f"elastic_{encoder.FAMILY}"
        enc["plan"] = plan
        conf["model"] = "compressed"
        if spec.decoder_bits:
            dq = model.decoder_quant
            model_conf["decoder_quant"] = {"bits": spec.decoder_bits, "method": dq.method,
                                           "per_channel": dq.per_channel, "exclude": list(dq.exclude)}
    conf["model_conf"] = model_conf
    conf.pop("init_param", None)
    return conf, stock


def export_system(train_config: Union[str, Path], model_file: Union[str, Path], system: Optional[str],
                  out_dir: Union[str, Path], plan: Optional[Mapping[str, Any]] = None) -> SystemExport:
    """Write ``out_dir/config.yaml`` and the system's checkpoint (stock ``.pth`` or packed).

    ``system`` names one of ``model_conf.systems``; alternatively ``plan`` (``system=None``) is any
    plan the encoder accepts, e.g. ``{"depth": 3}`` or ``{"depth": 6, "path_index": 4}`` for a
    foldable seed or ``{"blocks": [0, 2]}`` for layer skipping, exported at full precision with the
    decoder of the largest system. Works for single-system models with an elastic encoder too.
    """
    from espnet2.tasks.asr import ASRTask

    from espnet_compress.models.systems import SystemSpec
    from espnet_compress.quant.packed import save_packed

    train_config, out_dir = Path(train_config), Path(out_dir)
    if (system is None) == (plan is None):
        raise ValueError("export_system: give exactly one of a system name or a plan")
    model, _ = ASRTask.build_model_from_file(train_config, model_file, "cpu")
    if plan is not None:
        if not isinstance(model.encoder, ElasticEncoder) or not hasattr(model, "systems"):
            raise ValueError(f"{train_config}: exporting a plan needs model 'compressed' with an elastic encoder")
        system = str(plan.get("name", "plan"))
        resolved = model.encoder.check_plan(dict(plan), name=system)  # PlanError names the problem
        model.systems = dict(model.systems or {}, **{system: SystemSpec(system, resolved)})
    elif not getattr(model, "systems", None):
        raise ValueError(f"{train_config}: the model declares no model_conf.systems; nothing to export per system")
    if system not in model.systems:
        raise ValueError(f"unknown system '{system}'; {train_config} declares {list(model.systems)}")
    raw_conf = yaml.safe_load(train_config.read_text())
    conf, stock = system_config(raw_conf, model, system)
    quantized = conf["encoder"].startswith("quantized_") or "decoder_quant" in conf["model_conf"]
    state = system_state_dict(model, system)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.yaml"
    atomic_write_text(config_path, yaml.safe_dump(conf, sort_keys=False))
    standalone, _ = _build(config_path)
    expected = standalone.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise RuntimeError(f"system '{system}': exported weights lack {missing[:5]} (internal error)")
    standalone.load_state_dict({k: state[k] for k in expected}, strict=True)
    if quantized:
        model_path = out_dir / "model.packed.pth"
        save_packed(standalone, model_path)
    else:
        model_path = out_dir / "model.pth"
        import io

        buf = io.BytesIO()
        torch.save(standalone.state_dict(), buf)
        atomic_write_bytes(model_path, buf.getvalue())
    n = sum(p.numel() for p in standalone.parameters())
    log.info("exported system '%s' (%s, %d parameters) to %s", system, "stock" if stock else conf["encoder"], n, out_dir)
    return SystemExport(system, config_path, model_path, stock, quantized, n)


def _build(config_path: Path) -> Tuple[torch.nn.Module, Any]:
    from espnet2.tasks.asr import ASRTask

    return ASRTask.build_model_from_file(config_path, None, "cpu")
