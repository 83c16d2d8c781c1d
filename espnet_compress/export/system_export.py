"""Export one system of a multi-system model as a standalone ESPnet model.

A system keeps only what it runs: the physical blocks its plan uses (renumbered in order of first
use), each FFN cut to the widest width the plan asks of it, and the decoder at the system's
precision. Then:

* a full-precision system that runs each kept block once at one FFN width is a plain host
  network: for the Conformer it is exported as ESPnet's stock ``conformer`` with model ``espnet``,
  a checkpoint that loads and decodes **without** this plugin;
* any other system (quantized, repeated blocks, per-step widths, or a host without a stock ESPnet
  twin such as wav2vec2) is exported with our encoder and the plan baked in as its default, as a
  packed checkpoint when it is quantized.

Exactness: the standalone model computes what the system computes inside the supernet. Per-step
widths keep every kept block at the plan's widest width (the host networks have one FFN size);
a quantized block run narrower stores the codes the supernet computed for that narrower slice,
padded with zero codes it never reads. A block run at two widths with max-scale quantization has
two different quantizations of one tensor, which one packed tensor cannot hold: it is refused by
name (``lsq`` steps do not depend on the slice, so there the narrow run is a slice of the wide one).
Batch-norm statistics are the system's own (:mod:`~espnet_compress.core.norm_stats`).
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
from espnet_compress.core.norm_stats import SLOT_CONTAINER, SystemBatchNorm, slot_name
from espnet_compress.encoders.elastic import ElasticEncoder
from espnet_compress.models.compressed_asr import multi_system_options
from espnet_compress.quant.api import QuantConfig, quantized_modules
from espnet_compress.quant.modules import is_quantizable
from espnet_compress.quant.quantizers import QUANTIZERS, BitPlaneQuantizer, LearnedScaleQuantizer
from espnet_compress.utils.io import atomic_write_bytes, atomic_write_text
from espnet_compress.utils.params import count_parameters

log = logging.getLogger(__name__)



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
    width the plan uses: ESPnet's Conformer gives every block the same ``linear_units``), and
    its own batch-norm statistics: use ``k`` of a block goes to the standalone block's slot for
    use ``k`` (the norm's own buffers for the first)."""
    kept, remap, steps, widths = _layout(model, name)
    width = max(widths)
    encoder = model.encoder
    block_key, (by_rows, by_cols) = _block_key(encoder), _ffn_slices(encoder)
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        m = block_key.match(key)
        if m is None:
            out[key] = value.clone()
            continue
        old, rest = int(m.group(1)), m.group(2)
        if old not in remap or f".{SLOT_CONTAINER}." in f".{rest}":
            continue
        if by_rows.match(rest):
            value = value[:width]
        elif by_cols.match(rest):
            value = value[:, :width]
        out[f"encoder.{encoder.blocks_name}.{remap[old]}.{rest}"] = value.clone()
    plan = model.systems[name].plan
    blocks = list(encoder.blocks.physical_blocks())
    for b, use in zip(plan.blocks, plan.uses()):
        source_slot = encoder.blocks.stats_slot(plan, b, use)
        target_prefix = f"encoder.{encoder.blocks_name}.{remap[b]}."
        for norm_name, norm in ((n, m) for n, m in blocks[b].named_modules() if isinstance(m, SystemBatchNorm)):
            source = norm if source_slot is None else norm.slots[source_slot]
            target = norm_name + ("." if use == 0 else f".{SLOT_CONTAINER}.{slot_name(name, use)}.")
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                out[f"{target_prefix}{target}{buf}"] = getattr(source, buf).detach().clone()
    return out


def narrowed_encodings(model: torch.nn.Module, name: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Codes of the quantized FFN layers that the system runs narrower than the supernet's width:
    what the supernet computed for the slice, padded to the stored width with codes that are
    never read (state-dict key in the standalone model -> codes, scale). A whole-tensor
    quantizer (bit planes) computed the slice from the whole weight's codes, so the standalone
    layer stores that slice even at its own full width (re-encoding the cut weight would pick
    another scale)."""
    spec, encoder = model.systems[name], model.encoder
    kept, remap, steps, widths = _layout(model, name)
    stored = max(widths)
    used: Dict[int, set] = {}
    for b, k in zip(spec.plan.blocks, widths):
        used.setdefault(b, set()).add(k)
    blocks = list(encoder.blocks.physical_blocks())
    out: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for b, ks in used.items():
        for ffn_name, ffn in ((n, f) for n, f in blocks[b].named_children() if isinstance(f, ElasticFFN)):
            for attr, dim in ((ffn.IN, 0), (ffn.OUT, 1)):
                layer = getattr(ffn, attr)
                module_name = f"{encoder.block_name(b)}.{ffn_name}.{attr}"
                bits = spec.plan.bits_for(module_name)
                if not bits or not hasattr(layer, "weight_quantizer"):
                    continue
                quantizer = layer.weight_quantizer
                whole = quantizer.whole_tensor
                if len(ks) > 1 and not (whole or isinstance(quantizer, LearnedScaleQuantizer)):
                    raise ValueError(
                        f"system '{name}': block {b} runs at FFN widths {sorted(ks)} with {bits}-bit max-scale "
                        f"weights ('{module_name}'); each width has its own scale, and one packed tensor holds "
                        f"one quantization: give the block one width in this system, or train with "
                        f"quant_conf.method lsq or bitplane (their codes do not depend on the width)"
                    )
                k = min(ks)
                if whole:
                    if stored == ffn.full_units:
                        continue
                    with torch.no_grad():
                        codes, scale = quantizer.encode(layer.weight, bits)
                    codes = codes[:stored] if dim == 0 else codes[:, :stored]
                    if dim == 0 and scale.dim() == 1:
                        scale = scale[:stored]
                    out[f"encoder.{encoder.blocks_name}.{remap[b]}.{ffn_name}.{attr}.weight"] = (codes, scale)
                    continue
                if k == stored or len(ks) > 1:
                    continue
                w = layer.weight[:k] if dim == 0 else layer.weight[:, :k]
                with torch.no_grad():
                    codes, scale = quantizer.encode(w, bits)
                pad = list(codes.shape)
                pad[dim] = stored - k
                codes = torch.cat([codes, torch.full(pad, 1 if bits == 1 else 0, dtype=codes.dtype)], dim=dim)
                if dim == 0 and scale.dim() == 1:
                    scale = torch.cat([scale, torch.ones(stored - k, dtype=scale.dtype)])
                out[f"encoder.{encoder.blocks_name}.{remap[b]}.{ffn_name}.{attr}.weight"] = (codes, scale)
    return out


def _nesting(config: QuantConfig) -> Dict[str, Any]:
    """``bit_choices`` a standalone bit-plane system keeps: its codes are slices of the widest
    width's, so its quantizer must know that width (with its own width alone it would encode
    directly at it, another grid)."""
    if not issubclass(QUANTIZERS[config.method], BitPlaneQuantizer):
        return {}
    return {"bit_choices": list(config.choices())}


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
    dropped = multi_system_options()
    model_conf = {k: v for k, v in conf.get("model_conf", {}).items() if k not in dropped}
    model_conf.pop("decoder_quant", None)
    stock = uniform and not quantized and encoder.STOCK_ENCODER is not None
    if stock:
        conf["encoder"], conf["model"] = encoder.STOCK_ENCODER, "espnet"
    else:
        plan: Dict[str, Any] = {"name": name, "blocks": steps}
        if len(set(widths)) > 1:
            plan["ffn_units"] = widths
        if any(b for _, b in spec.plan.bits):
            enc_q = encoder.quant_config
            block_key = _block_key(encoder)
            def standalone_name(mod_name: str) -> Optional[str]:
                m = block_key.match(f"encoder.{mod_name}")
                if m is None:
                    return mod_name
                return None if int(m.group(1)) not in remap else f"{encoder.block_name(remap[int(m.group(1))])}.{m.group(2)}"

            rules = {standalone_name(n): spec.plan.bits_for(n) for n in quantized_modules(encoder)}
            rules.pop(None, None)
            enc["quant_conf"] = {"bits": rules, "method": enc_q.method, "per_channel": enc_q.per_channel,
                                 "conv2d": enc_q.conv2d, **_nesting(enc_q)}
            # layers quant_conf.exclude kept fp32 carry no quantizer (nor its parameters) standalone either
            excluded = [standalone_name(n) for n, m in encoder.named_modules() if n and is_quantizable(m)]
            if any(excluded):
                enc["quant_conf"]["exclude"] = [n for n in excluded if n]
        conf["encoder"] = f"elastic_{encoder.FAMILY}"
        enc["plan"] = plan
        conf["model"] = "compressed"
        if spec.decoder_bits:
            dq = model.decoder_quant
            model_conf["decoder_quant"] = {"bits": spec.decoder_bits, "method": dq.method,
                                           "per_channel": dq.per_channel, "exclude": list(dq.exclude),
                                           "embedding": dq.embedding, "output_layer": dq.output_layer, "ctc": dq.ctc,
                                           **_nesting(dq)}
    conf["model_conf"] = model_conf
    conf.pop("init_param", None)
    return conf, stock


def export_system(train_config: Union[str, Path], model_file: Union[str, Path], system: Optional[str],
                  out_dir: Union[str, Path], plan: Optional[Mapping[str, Any]] = None,
                  plan_decoder_bits: int = 0, ternary_packing: str = "bits") -> SystemExport:
    """Write ``out_dir/config.yaml`` and the system's checkpoint (stock ``.pth`` or packed).

    ``system`` names one of ``model_conf.systems``; alternatively ``plan`` (``system=None``) is any
    plan the encoder accepts, e.g. ``{"depth": 3}`` or ``{"depth": 6, "path_index": 4}`` for a
    foldable seed, ``{"blocks": [0, 2]}`` for layer skipping, or a fixed per-layer precision mix
    (``bits`` rules), exported with the decoder of the largest system at ``plan_decoder_bits``
    (0 = full precision). Works for single-system models with an elastic encoder too.
    ``ternary_packing``: layout of 2-bit codes in a packed export (``bits`` or ``trits``).
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
        model.systems = dict(model.systems or {}, **{system: SystemSpec(system, resolved, plan_decoder_bits)})
    elif not getattr(model, "systems", None):
        raise ValueError(f"{train_config}: the model declares no model_conf.systems; nothing to export per system")
    if system not in model.systems:
        raise ValueError(f"unknown system '{system}'; {train_config} declares {list(model.systems)}")
    raw_conf = yaml.safe_load(train_config.read_text())
    conf, stock = system_config(raw_conf, model, system)
    quantized = "quant_conf" in conf["encoder_conf"] or "decoder_quant" in conf["model_conf"]
    state = system_state_dict(model, system)
    encodings = narrowed_encodings(model, system) if quantized else {}
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
        save_packed(standalone, model_path, encodings=encodings, ternary_packing=ternary_packing)
    else:
        model_path = out_dir / "model.pth"
        import io

        buf = io.BytesIO()
        torch.save(standalone.state_dict(), buf)
        atomic_write_bytes(model_path, buf.getvalue())
    n = count_parameters(standalone)
    log.info("exported system '%s' (%s, %d parameters) to %s", system, "stock" if stock else conf["encoder"], n, out_dir)
    return SystemExport(system, config_path, model_path, stock, quantized, n)


def _build(config_path: Path) -> Tuple[torch.nn.Module, Any]:
    from espnet2.tasks.asr import ASRTask

    return ASRTask.build_model_from_file(config_path, None, "cpu")
