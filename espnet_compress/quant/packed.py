"""Packed low-bit checkpoints: integer codes bit-packed at their width, in a file ESPnet can load.

File layout (``torch.save`` of a two-entry dict, so stock ``Speech2Text``/``asr_inference``, which
``torch.load`` the model file, can read it)::

    {"__espnet_compress_packed__": <JSON header>, "blob": <uint8 tensor>}

The header lists every state-dict entry with its byte range in ``blob``: quantized weights as
``bits``-wide codes (:mod:`.bitpack`) plus their scale(s), everything else (biases, norms,
embeddings, learned steps) as raw tensors in the configured float dtype. It also holds the format
version and the SHA-256 of the blob, so a truncated or corrupted file is refused with a message
naming it. Loading restores the exact dequantized weights (codes x scale), which the QAT model's
quantizers map back to the same codes: the packed model computes what the QAT model computed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from espnet_compress.quant.api import quantized_modules
from espnet_compress.quant.bitpack import pack_codes, packed_nbytes, unpack_codes
from espnet_compress.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

MAGIC = "__espnet_compress_packed__"
FORMAT_VERSION = 1
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PackedModelError(ValueError):
    """A packed checkpoint that cannot be used (corrupt, truncated, wrong version); names the file."""


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


def _group(name: str, bits: int) -> str:
    part = name.split(".", 1)[0]
    kind = "quantized weights" if bits else "full-precision tensors"
    return f"{part} {kind}"


def pack_model(model: torch.nn.Module, fp_dtype: str = "float32", scale_dtype: str = "float32") -> Tuple[Dict[str, Any], bytes]:
    """Pack ``model.state_dict()``: quantized modules at their current bit width, the rest raw.

    Returns the header (JSON-able) and the blob. ``fp_dtype`` applies to floating tensors that are
    not quantized, ``scale_dtype`` to quantization scales (including learned LSQ steps).
    """
    if fp_dtype not in _FLOAT_DTYPES or scale_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fp_dtype/scale_dtype must be one of {sorted(_FLOAT_DTYPES)}")
    qmods = {f"{n}.weight": m for n, m in quantized_modules(model).items() if m.bits}
    records: List[TensorRecord] = []
    chunks: List[bytes] = []
    offset = 0
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if name in qmods:
            module = qmods[name]
            codes, scale = module.weight_quantizer.encode(module.weight, module.bits)
            scale = scale.detach().cpu().to(_FLOAT_DTYPES[scale_dtype])
            data = pack_codes(codes.numpy(), module.bits) + _tensor_bytes(scale)
            rec = TensorRecord(name, list(tensor.shape), str(tensor.dtype).replace("torch.", ""), offset, len(data),
                               bits=module.bits, scale_shape=list(scale.shape), group=_group(name, module.bits))
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
    header = {
        "format": "espnet_compress.packed",
        "version": FORMAT_VERSION,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "blob_bytes": len(blob),
        "scale_dtype": scale_dtype,
        "tensors": [dataclasses.asdict(r) for r in records],
    }
    return header, blob


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
                scale_dtype: str = "float32") -> Dict[str, Any]:
    """Write a packed checkpoint atomically (temp file, then rename); return its header."""
    import io

    header, blob = pack_model(model, fp_dtype=fp_dtype, scale_dtype=scale_dtype)
    buf = io.BytesIO()
    torch.save({MAGIC: json.dumps(header), "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return header


def is_packed(state: Mapping[str, Any]) -> bool:
    return isinstance(state, Mapping) and MAGIC in state


def unpack_state_dict(state: Mapping[str, Any], source: str = "packed checkpoint") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Verify and expand a loaded packed checkpoint into a float state dict (and its header)."""
    try:
        header = json.loads(state[MAGIC])
        blob_t = state["blob"]
    except (KeyError, TypeError, ValueError) as err:
        raise PackedModelError(f"{source}: not a valid espnet_compress packed checkpoint ({err})") from None
    if header.get("format") != "espnet_compress.packed":
        raise PackedModelError(f"{source}: unknown format {header.get('format')!r}")
    if header.get("version") != FORMAT_VERSION:
        raise PackedModelError(
            f"{source}: packed format version {header.get('version')} is not supported by this "
            f"espnet_compress (reads version {FORMAT_VERSION}); repack the model or upgrade"
        )
    blob = blob_t.numpy().tobytes()
    if len(blob) != header["blob_bytes"] or hashlib.sha256(blob).hexdigest() != header["sha256"]:
        raise PackedModelError(
            f"{source}: checksum mismatch (payload {len(blob)} bytes, expected {header['blob_bytes']}); "
            f"the file is truncated or corrupted, re-export or re-download it"
        )
    out: Dict[str, torch.Tensor] = {}
    for rec in header["tensors"]:
        data = blob[rec["offset"]: rec["offset"] + rec["nbytes"]]
        if rec["bits"]:
            numel = int(np.prod(rec["shape"])) if rec["shape"] else 1
            ncode = packed_nbytes(numel, rec["bits"])
            codes = torch.from_numpy(unpack_codes(data[:ncode], rec["bits"], numel)).reshape(rec["shape"])
            scale = _tensor_from_bytes(data[ncode:], header["scale_dtype"], rec["scale_shape"]).float()
            s = scale if scale.dim() == 0 else scale.reshape(-1, *([1] * (codes.dim() - 1)))
            out[rec["name"]] = (codes.float() * s).to(getattr(torch, rec["dtype"]))
        else:
            out[rec["name"]] = _tensor_from_bytes(data, rec["dtype"], rec["shape"])
    return out, header


def load_packed(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
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


def size_report(header: Mapping[str, Any]) -> Dict[str, int]:
    """Bytes per tensor group in the blob (quantized weights incl. scales vs full-precision tensors)."""
    groups: Dict[str, int] = {}
    for rec in header["tensors"]:
        groups[rec["group"]] = groups.get(rec["group"], 0) + rec["nbytes"]
    return dict(sorted(groups.items()))
