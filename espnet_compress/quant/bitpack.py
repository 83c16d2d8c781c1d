"""Dense bit packing of small signed integer codes (1..8 bits per value).

Codes of an n-bit symmetric grid lie in ``[-q, q]``; they are offset to ``[0, 2q]`` and written as
an n-bit little-endian bit stream. 1, 2, 4 and 8 bits therefore fill bytes exactly (8, 4, 2, 1 codes
per byte); 3, 5 and 6 bits are packed at their true width across byte boundaries, so every width's
bytes on disk are ``ceil(numel * n / 8)``. 1-bit codes {-1, +1} are stored as {0, 1}.
"""
from __future__ import annotations

import numpy as np

from espnet_compress.quant.quantizers import check_bits, qmax


def _offset(bits: int) -> int:
    return 1 if bits == 1 else qmax(bits)


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack int codes in ``[-q, q]`` (``{-1, 1}`` for 1 bit) into ``packed_nbytes`` bytes."""
    check_bits(bits)
    flat = np.asarray(codes, dtype=np.int16).reshape(-1)
    if bits == 1:
        if flat.size and not np.all((flat == 1) | (flat == -1)):
            raise ValueError("1-bit codes must be -1 or +1")
        unsigned = ((flat + 1) // 2).astype(np.uint8)
    else:
        q = qmax(bits)
        if flat.size and (flat.min() < -q or flat.max() > q):
            raise ValueError(f"{bits}-bit codes must lie in [-{q}, {q}]")
        unsigned = (flat + q).astype(np.uint8)
    if bits == 8:
        return unsigned.tobytes()
    bit_planes = (unsigned[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bit_planes.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: int8 codes of length ``numel``."""
    check_bits(bits)
    if len(data) != packed_nbytes(numel, bits):
        raise ValueError(f"expected {packed_nbytes(numel, bits)} bytes for {numel} {bits}-bit codes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        unsigned = raw.astype(np.int16)
    else:
        planes = np.unpackbits(raw, bitorder="little")[: numel * bits].reshape(numel, bits)
        unsigned = (planes.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(axis=1)
    if bits == 1:
        return (unsigned * 2 - 1).astype(np.int8)
    return (unsigned - _offset(bits)).astype(np.int8)
