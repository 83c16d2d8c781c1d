"""Packed low-bit checkpoints: integer codes bit-packed at their width, in a file ESPnet can load.

File layout (``torch.save`` of a two-entry dict, so stock ``Speech2Text``/``asr_inference``, which
``torch.load`` the model file, can read it)::

    {"__espnet_compress_packed__": <JSON header>, "blob": <uint8 tensor>}

The header lists every state-dict entry with its byte range in ``blob``: quantized weights as
``bits``-wide codes (:mod:`.bitpack`; ternary codes optionally as trits, five per byte, marked
``"packing": "trits"`` in their record) plus their scale(s), everything else (biases, norms,
embeddings, learned steps) as raw tensors in the configured float dtype. Format 2 hashes the
header *and* the blob (SHA-256), so a changed offset, width or shape is refused like a corrupted
payload; format 1 files (payload hash only) still load, with every record checked for
consistency. A record marked ``"nested": true`` holds bit planes (:class:`~.quantizers.BitPlaneQuantizer`):
the widest width's codes, from which a system at a narrower width takes its top bits at load, so
one file of a nested supernet decodes every system. Loading keeps the file's codes and scales: the model computes with exactly those
(it never re-derives them from a config), and every record is checked against the module it loads
into (shape, bit width, scale shape), each failure a :class:`PackedModelError` naming the file and
the tensor.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from espnet_compress.env import settings
from espnet_compress.models.decoder_step import lean_decoder_steps
from espnet_compress.models.full_masks import skip_full_masks
from espnet_compress.models.memory_cache import cache_source_attention
from espnet_compress.quant.api import quantized_modules
from espnet_compress.quant.bitpack import check_packing, nbytes, pack, unpack
from espnet_compress.quant.inference import freeze_for_inference
from espnet_compress.quant.quantizers import SUPPORTED_BITS, BitPlaneQuantizer, WeightQuantizer
from espnet_compress.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

MAGIC = "__espnet_compress_packed__"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_RAW_DTYPES = dict(_FLOAT_DTYPES, int64=torch.int64, int32=torch.int32, bool=torch.bool, uint8=torch.uint8,
                   int8=torch.int8)

#: ``(codes, scale)`` of one quantized weight, as a quantizer's ``encode`` returns them
Encoding = Tuple[torch.Tensor, torch.Tensor]


class PackedModelError(ValueError):
    """A packed checkpoint that cannot be used (corrupt, truncated, wrong version, or not the
    model its config builds); the message names the file and the tensor."""


@dataclasses.dataclass
class TensorRecord:
    """Where one state-dict entry lives in the blob and how to rebuild it."""

    name: str
    shape: List[int]
    dtype: str
    offset: int
    nbytes: int
    bits: int = 0  # 0: raw tensor; else codes of this width followed by the scale(s)
    scale_shape: Optional[List[int]] = None
    group: str = "other"
    packing: str = "bits"  # code layout (:mod:`.bitpack`); "trits": ternary codes 5 per byte
    nested: bool = False  # bit planes: narrower widths are sliced from these codes at load

    def to_header(self) -> Dict[str, Any]:
        """The header entry; ``packing`` and ``nested`` only when not the default, so files
        without them keep the header (and checksum) they had before the options existed."""
        rec = dataclasses.asdict(self)
        if rec["packing"] == "bits":
            del rec["packing"]
        if not rec["nested"]:
            del rec["nested"]
        return rec


@dataclasses.dataclass
class PackedState:
    """A verified packed checkpoint: the float state dict, the stored codes of every quantized
    weight (by state-dict key), and the header."""

    tensors: Dict[str, torch.Tensor]
    encodings: Dict[str, Tuple[torch.Tensor, torch.Tensor, int]]
    header: Dict[str, Any]
    nested: FrozenSet[str] = frozenset()  # keys stored as bit planes
    dequantized: bool = True  # False: quantized weights in ``tensors`` are shape-only placeholders


def _group(name: str, bits: int) -> str:
    part = name.split(".", 1)[0]
    kind = "quantized weights" if bits else "full-precision tensors"
    return f"{part} {kind}"


def _digest(header: Mapping[str, Any], blob: bytes) -> str:
    """Format 2 checksum: the header without its checksum, canonical JSON, then the payload."""
    body = {k: v for k, v in header.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    h.update(blob)
    return h.hexdigest()


def pack_model(model: torch.nn.Module, fp_dtype: str = "float32", scale_dtype: str = "float32",
               encodings: Optional[Mapping[str, Encoding]] = None,
               ternary_packing: str = "bits", planes: bool = False) -> Tuple[Dict[str, Any], bytes]:
    """Pack ``model.state_dict()``: quantized modules at their current bit width, the rest raw.

    Returns the header (JSON-able) and the blob. ``fp_dtype`` applies to floating tensors that are
    not quantized, ``scale_dtype`` to quantization scales (including learned LSQ steps).
    ``encodings`` (state-dict key -> codes, scale) stores given codes instead of encoding the
    module's weight: a system export passes what the supernet computed for a narrowed layer.
    ``ternary_packing``: layout of 2-bit (ternary) codes, ``bits`` (4 per byte) or ``trits``
    (5 per byte, 1.6 bits per weight).
    ``planes``: store every bit-plane quantized weight at its widest width, whatever width the
    active system runs (records marked ``nested``): the file of a whole nested supernet.
    """
    if fp_dtype not in _FLOAT_DTYPES or scale_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fp_dtype/scale_dtype must be one of {sorted(_FLOAT_DTYPES)}")
    check_packing(ternary_packing, 2)
    qmods = {f"{n}.weight": m for n, m in quantized_modules(model).items() if m.bits or (planes and stores_planes(m))}
    records: List[TensorRecord] = []
    chunks: List[bytes] = []
    offset = 0
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if name in qmods:
            module = qmods[name]
            nested = planes and stores_planes(module)
            bits = module.weight_quantizer.master_bits if nested else module.bits
            if encodings is not None and name in encodings:
                codes, scale = encodings[name]
            else:
                codes, scale = module.weight_quantizer.encode(module.weight, bits)
            scale = scale.detach().cpu().to(_FLOAT_DTYPES[scale_dtype])
            packing = ternary_packing if bits == 2 else "bits"
            data = pack(codes.numpy(), bits, packing) + _tensor_bytes(scale)
            rec = TensorRecord(name, list(tensor.shape), str(tensor.dtype).replace("torch.", ""), offset, len(data),
                               bits=bits, scale_shape=list(scale.shape), group=_group(name, bits),
                               packing=packing, nested=nested)
        else:
            if tensor.is_floating_point():
                # Learned (LSQ) steps are scales: the loaded layer re-encodes its weight with them,
                # so they must be stored exactly like the scales next to the codes.
                is_step = ".weight_quantizer." in name
                tensor = tensor.to(_FLOAT_DTYPES[scale_dtype if is_step else fp_dtype])
            data = _tensor_bytes(tensor)
            rec = TensorRecord(name, list(tensor.shape), str(tensor.dtype).replace("torch.", ""), offset, len(data),
                               group=_group(name, 0))
        records.append(rec)
        chunks.append(data)
        offset += len(data)
    blob = b"".join(chunks)
    header: Dict[str, Any] = {
        "format": "espnet_compress.packed",
        "version": FORMAT_VERSION,
        "blob_bytes": len(blob),
        "scale_dtype": scale_dtype,
        "tensors": [r.to_header() for r in records],
    }
    header["sha256"] = _digest(header, blob)
    return header, blob


def stores_planes(module: torch.nn.Module) -> bool:
    """Whether a quantized module stores bit planes (narrower widths sliced from its codes)."""
    return isinstance(module.weight_quantizer, BitPlaneQuantizer)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _tensor_from_bytes(data: bytes, dtype: str, shape: List[int]) -> torch.Tensor:
    tdtype = getattr(torch, dtype)
    if tdtype == torch.bfloat16:
        return torch.from_numpy(np.frombuffer(data, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
    np_dtype = torch.empty((), dtype=tdtype).numpy().dtype
    return torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()).reshape(shape)


def save_packed(model: torch.nn.Module, path: Union[str, Path], fp_dtype: str = "float32",
                scale_dtype: str = "float32", encodings: Optional[Mapping[str, Encoding]] = None,
                ternary_packing: str = "bits", planes: bool = False) -> Dict[str, Any]:
    """Write a packed checkpoint atomically (temp file, then rename); return its header."""
    import io

    header, blob = pack_model(model, fp_dtype=fp_dtype, scale_dtype=scale_dtype, encodings=encodings,
                              ternary_packing=ternary_packing, planes=planes)
    buf = io.BytesIO()
    torch.save({MAGIC: json.dumps(header), "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return header


def is_packed(state: Mapping[str, Any]) -> bool:
    return isinstance(state, Mapping) and MAGIC in state


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=_RAW_DTYPES[dtype]).element_size()


def _numel(shape: List[int]) -> int:
    return int(np.prod(shape)) if shape else 1


def _check_records(header: Mapping[str, Any], blob_len: int, source: str) -> List[Dict[str, Any]]:
    """Every record well formed, its byte count what its shape, dtype and width imply, and the
    records tiling the blob in order: a damaged format-1 header (not covered by its checksum)
    fails here instead of deep inside numpy or torch."""
    records = header.get("tensors")
    scale_dtype = header.get("scale_dtype")
    if not isinstance(records, list) or scale_dtype not in _FLOAT_DTYPES:
        raise PackedModelError(f"{source}: header has no tensor list or an unknown scale_dtype {scale_dtype!r}")
    offset, seen = 0, set()
    for rec in records:
        name = rec.get("name") if isinstance(rec, Mapping) else None
        where = f"{source}: tensor '{name}'"
        try:
            shape, dtype, bits = [int(v) for v in rec["shape"]], rec["dtype"], int(rec["bits"])
            start, size = int(rec["offset"]), int(rec["nbytes"])
        except (KeyError, TypeError, ValueError) as err:
            raise PackedModelError(f"{where}: malformed header record ({err!r})") from None
        if name in seen:
            raise PackedModelError(f"{where}: listed twice in the header")
        seen.add(name)
        if dtype not in _RAW_DTYPES or (bits and bits not in SUPPORTED_BITS):
            raise PackedModelError(f"{where}: unknown dtype {dtype!r} or bit width {bits}")
        if bits:
            scale_shape = rec.get("scale_shape")
            if not isinstance(scale_shape, list):
                raise PackedModelError(f"{where}: quantized record without scale_shape")
            if not isinstance(rec.get("nested", False), bool):
                raise PackedModelError(f"{where}: 'nested' must be true or false, got {rec.get('nested')!r}")
            packing = rec.get("packing", "bits")
            try:
                check_packing(packing, bits)
            except ValueError as err:
                raise PackedModelError(f"{where}: {err}") from None
            expected = nbytes(_numel(shape), bits, packing) + _numel(scale_shape) * _itemsize(scale_dtype)
        else:
            if rec.get("nested"):
                raise PackedModelError(f"{where}: marked nested (bit planes) but stored in full precision")
            expected = _numel(shape) * _itemsize(dtype)
        if size != expected:
            layout = f" ({rec.get('packing', 'bits')})" if bits else ""
            raise PackedModelError(f"{where}: {size} bytes in the header, but shape {shape} at "
                                   f"{bits or dtype}{'-bit' if bits else ''}{layout} takes {expected}")
        if start != offset:
            raise PackedModelError(f"{where}: starts at byte {start}, expected {offset} (records must tile the blob)")
        offset += size
    if offset != blob_len:
        raise PackedModelError(f"{source}: records cover {offset} bytes, the payload has {blob_len}")
    return records


def unpack_state_dict(state: Mapping[str, Any], source: str = "packed checkpoint",
                      dequantize: bool = True,
                      before_expanding: Optional[Callable[[List[str]], None]] = None) -> PackedState:
    """Verify and expand a loaded packed checkpoint (float tensors, stored codes, header).

    ``dequantize=False`` (the load hook): quantized weights get a zero-stride placeholder of their
    shape in ``tensors`` instead of ``codes x scale``; the hook's freeze builds every quantized
    layer from the codes anyway, and one fp32 copy of the weights fewer keeps the peak memory of
    a load below that of the fp32 checkpoint's. The payload is read in place (no copy).
    ``before_expanding`` gets the keys of the coded weights once the file is verified and before
    any code is expanded (the load hook frees the model's fp32 weights there).
    """
    try:
        header = json.loads(state[MAGIC])
        blob_t = state["blob"]
        blob = memoryview(blob_t.numpy())
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PackedModelError(f"{source}: not a valid espnet_compress packed checkpoint ({err})") from None
    if not isinstance(header, dict) or header.get("format") != "espnet_compress.packed":
        raise PackedModelError(f"{source}: unknown format {header.get('format') if isinstance(header, dict) else header!r}")
    version = header.get("version")
    if version not in READABLE_VERSIONS:
        raise PackedModelError(
            f"{source}: packed format version {version} is not supported by this espnet_compress "
            f"(reads versions {list(READABLE_VERSIONS)}); repack the model or upgrade"
        )
    digest = _digest(header, blob) if version >= 2 else hashlib.sha256(blob).hexdigest()
    if len(blob) != header.get("blob_bytes") or digest != header.get("sha256"):
        raise PackedModelError(
            f"{source}: checksum mismatch (payload {len(blob)} bytes, header says {header.get('blob_bytes')}); "
            f"the file is truncated or corrupted, re-export or re-download it"
        )
    records = _check_records(header, len(blob), source)
    if before_expanding is not None:
        before_expanding([rec["name"] for rec in records if rec["bits"]])
    scale_dtype = header["scale_dtype"]
    out: Dict[str, torch.Tensor] = {}
    encodings: Dict[str, Tuple[torch.Tensor, torch.Tensor, int]] = {}
    nested = frozenset(rec["name"] for rec in records if rec.get("nested"))
    for rec in records:
        data = blob[rec["offset"]: rec["offset"] + rec["nbytes"]]
        if rec["bits"]:
            packing = rec.get("packing", "bits")
            ncode = nbytes(_numel(rec["shape"]), rec["bits"], packing)
            try:
                flat = unpack(data[:ncode], rec["bits"], _numel(rec["shape"]), packing)
            except ValueError as err:
                raise PackedModelError(f"{source}: tensor '{rec['name']}': {err}") from None
            codes = torch.from_numpy(flat).reshape(rec["shape"])
            scale = _tensor_from_bytes(data[ncode:], scale_dtype, rec["scale_shape"]).float()
            out[rec["name"]] = _dequantize(codes, scale, rec["dtype"]) if dequantize else _placeholder(rec)
            encodings[rec["name"]] = (codes, scale, rec["bits"])
        else:
            out[rec["name"]] = _tensor_from_bytes(data, rec["dtype"], rec["shape"])
    if version < FORMAT_VERSION:
        log.info("%s: packed format %d (header not covered by the checksum); records checked one by one",
                 source, version)
    return PackedState(out, encodings, header, nested, dequantize)


def _placeholder(rec: Mapping[str, Any]) -> torch.Tensor:
    """A tensor of the record's shape and dtype that takes no memory (zeros, stride 0)."""
    return torch.zeros((), dtype=getattr(torch, rec["dtype"])).expand(rec["shape"])


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    return WeightQuantizer.decode(codes, scale.float(), codes).to(getattr(torch, dtype))


def check_against_model(packed: PackedState, model: torch.nn.Module, source: str,
                        fillable: Tuple[str, ...] = ()) -> None:
    """Refuse a packed file that is not the model its config builds: every tensor present with the
    same shape, every stored width the width the config sets for that module (the file's codes
    are what the model will compute with, so a config asking for other bits is an error, not a
    silent re-quantization), scales shaped as the module's quantizer makes them. State-dict keys
    containing one of ``fillable`` may be absent (buffers the model fills in itself on load)."""
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(packed.tensors) if not any(f in k for f in fillable))
    extra = sorted(set(packed.tensors) - set(expected))
    if missing or extra:
        raise PackedModelError(
            f"{source}: does not match the model built from its config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for name, tensor in packed.tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise PackedModelError(f"{source}: tensor '{name}' has shape {list(tensor.shape)} in the file, the "
                                   f"config builds {list(expected[name].shape)}")
    qmods = {f"{n}.weight": m for n, m in quantized_modules(model).items()}
    for name, module in qmods.items():
        stored = packed.encodings.get(name)
        stored_bits = 0 if stored is None else stored[2]
        if name in packed.nested:
            _check_planes(name, module, stored_bits, source)
        elif stored_bits != module.bits:
            raise PackedModelError(
                f"{source}: tensor '{name}' is stored at {stored_bits or 'full precision'}"
                f"{'-bit' if stored_bits else ''} but the config sets {module.bits or 'full precision'}"
                f"{'-bit' if module.bits else ''}; decode with the config the file was exported with"
            )
        if stored is not None:
            scale = stored[1]
            like = [module.weight.shape[0]] if getattr(module.weight_quantizer, "per_channel", False) else []
            if list(scale.shape) != like:
                raise PackedModelError(f"{source}: tensor '{name}' has scale shape {list(scale.shape)}, the "
                                       f"config's quantizer makes {like} (per_channel differs?)")
    stray = sorted(set(packed.encodings) - set(qmods))
    if stray:
        raise PackedModelError(f"{source}: tensor '{stray[0]}' is stored quantized but the config builds it "
                               f"in full precision; decode with the config the file was exported with")


def _check_planes(name: str, module: torch.nn.Module, stored_bits: int, source: str) -> None:
    """A bit-plane record serves a module of a bit-plane quantizer whose widest width is the
    stored one, at any of its widths except full precision (the file holds no fp weight)."""
    quantizer = module.weight_quantizer
    if not isinstance(quantizer, BitPlaneQuantizer) or quantizer.master_bits != stored_bits:
        built = (f"'{quantizer.__class__.__name__}' with widths {list(quantizer.bit_choices)}")
        raise PackedModelError(f"{source}: tensor '{name}' is stored as {stored_bits}-bit planes, but the config "
                               f"builds {built}; decode with the config the file was exported with "
                               f"(quant_conf.method bitplane, widest width {stored_bits})")
    if not module.bits:
        raise PackedModelError(f"{source}: tensor '{name}' is stored as {stored_bits}-bit planes, but the active "
                               f"system runs it in full precision, which the file does not hold; pick a "
                               f"quantized system (ESPNET_COMPRESS_SYSTEM)")


def at_model_widths(packed: PackedState, model: torch.nn.Module) -> PackedState:
    """Bit-plane records sliced to the width each module runs in the active system (the file's
    widest codes otherwise): the codes the supernet trained that system with."""
    if not packed.nested:
        return packed
    qmods = {f"{n}.weight": m for n, m in quantized_modules(model).items()}
    tensors, encodings = dict(packed.tensors), dict(packed.encodings)
    for name in packed.nested:
        module = qmods[name]
        codes, scale, _ = packed.encodings[name]
        codes, scale = module.weight_quantizer.narrow(codes, scale, module.bits)
        encodings[name] = (codes, scale, module.bits)
        if packed.dequantized:
            tensors[name] = _dequantize(codes, scale, str(packed.tensors[name].dtype).replace("torch.", ""))
    return dataclasses.replace(packed, tensors=tensors, encodings=encodings)


def loading_source(default: str = "packed checkpoint") -> str:
    """The model file being loaded, for error messages. ``load_state_dict`` hooks never see the
    path, so look for ESPnet's ``model_file`` argument up the stack (``build_model_from_file``,
    used by ``Speech2Text`` and ``asr_inference``); fall back to ``default``."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            value = frame.f_locals.get("model_file")
            if isinstance(value, (str, Path)):
                return str(value)
            frame = frame.f_back
    finally:
        del frame
    return default


def load_packed(path: Union[str, Path]) -> PackedState:
    """Read a packed file from disk (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise PackedModelError(f"{path}: no such packed checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged zip archives
        raise PackedModelError(f"{path}: cannot read packed checkpoint, the file is truncated or corrupted ({err})") from None
    if not is_packed(state):
        raise PackedModelError(f"{path}: not an espnet_compress packed checkpoint (no '{MAGIC}' entry)")
    return unpack_state_dict(state, str(path))


def release_freed_memory() -> None:
    """Hand memory freed during a load back to the OS (glibc's ``malloc_trim``). The fp32 model
    ESPnet builds before the packed file is loaded into it is freed by the freeze, but glibc keeps
    freed heap pages resident: without this the process stays as large as an fp32 one. No-op where
    glibc is not the allocator (the symbol is looked up in the running process, no library search)."""
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def decode_time_paths(model: torch.nn.Module) -> Tuple[int, int, int]:
    """What a packed load does to a model besides quantization: the decoder's source attention
    caches its keys and values per utterance, every attention skips masks that mask nothing, and
    the decoder's steps run without ESPnet's per-module wrappers (all exact). One function, so that
    the fp32 control of ``benchmarks/speed.py`` gets exactly this too. Returns (source attentions
    cached, attentions changed, decoders with the lean step)."""
    return cache_source_attention(model), skip_full_masks(model), lean_decoder_steps(model)


def size_report(header: Mapping[str, Any]) -> Dict[str, int]:
    """Bytes per tensor group in the blob (quantized weights incl. scales vs full-precision tensors)."""
    groups: Dict[str, int] = {}
    for rec in header["tensors"]:
        groups[rec["group"]] = groups.get(rec["group"], 0) + rec["nbytes"]
    return dict(sorted(groups.items()))


class PackedLoading:
    """``load_state_dict`` hooks that let a model take a packed file where a float checkpoint is
    expected, so stock ``Speech2Text``/``asr_inference`` (which ``torch.load`` the model file and
    load it with ``strict=False``) decode packed models unchanged.

    Before the load, the packed state is verified (:func:`unpack_state_dict`), checked against the
    model (:func:`check_against_model`; a silent partial load would decode with random weights,
    a width mismatch with weights the file never held) and expanded to float tensors. After it,
    every quantized layer is frozen to compute with the file's codes and scales, on the CPU kernel
    ``ESPNET_COMPRESS_KERNEL`` names (:mod:`espnet_compress.env`). ``fillable``: substrings of
    state-dict keys the model fills in itself when a file lacks them.
    """

    def __init__(self, model: torch.nn.Module, fillable: Tuple[str, ...] = ()) -> None:
        self.model, self.fillable = model, fillable
        self.pending: Optional[PackedState] = None
        model._register_load_state_dict_pre_hook(self.unpack, with_module=False)
        model.register_load_state_dict_post_hook(self.freeze)

    def unpack(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix or not is_packed(state_dict):
            return
        source = loading_source()
        packed = unpack_state_dict(state_dict, source, dequantize=False, before_expanding=self._release_float_weights)
        check_against_model(packed, self.model, source, fillable=self.fillable)
        packed = at_model_widths(packed, self.model)
        state_dict.clear()
        state_dict.update({k: v for k, v in packed.tensors.items() if k not in packed.encodings})
        self.pending = packed

    def _release_float_weights(self, coded: List[str]) -> None:
        """Free the fp32 weights the model was built with where the verified file has codes, before
        the codes are expanded: the freeze replaces those layers with ones built from the codes,
        and freeing first lets the codes, packed GEMM weights and timing inputs reuse that memory
        instead of adding to the load's peak. Each weight keeps its shape as a zero-stride
        placeholder (shape checks and queries still work) and its key is left out of the state
        dict (a copy into it would write zeros); the freeze hook takes those keys off the missing
        list. A file refused after this point leaves the freshly built model without weights,
        as a refused load leaves it unusable anyway."""
        params = dict(self.model.named_parameters())
        for name in coded:
            param = params.get(name)
            if param is not None:  # a key the model lacks is refused by check_against_model
                param.data = torch.zeros((), dtype=param.dtype).expand(param.shape)

    def freeze(self, module: torch.nn.Module, incompatible_keys: Any) -> None:
        if self.pending is None:
            return
        coded = self.pending.encodings
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in coded]
        encodings = {k: (codes, scale) for k, (codes, scale, _) in coded.items()}
        self.model.inference_paths = freeze_for_inference(self.model, settings().kernel, encodings)
        cached, unmasked, lean = decode_time_paths(self.model)
        self.pending = None
        release_freed_memory()
        log.info("loaded packed checkpoint; quantized layers frozen for inference; %d source attentions cache "
                 "their keys and values per utterance; %d attentions skip masks that mask nothing; %d decoders "
                 "step without ESPnet's per-module wrappers", cached, unmasked, lean)
