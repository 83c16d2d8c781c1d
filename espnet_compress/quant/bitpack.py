"""Dense bit packing of small signed integer codes (1..8 bits per value).

Codes of an n-bit symmetric grid lie in ``[-q, q]``; they are offset to ``[0, 2q]`` and written as
an n-bit little-endian bit stream. 1, 2, 4 and 8 bits therefore fill bytes exactly (8, 4, 2, 1 codes
per byte); 3, 5 and 6 bits are packed at their true width across byte boundaries, so every width's
bytes on disk are ``ceil(numel * n / 8)``. 1-bit codes {-1, +1} are stored as {0, 1}.

Ternary codes (2-bit grids: {-1, 0, +1}) can also be stored as *trits*, five per byte
(3^5 = 243 <= 256, i.e. 1.6 bits per weight instead of 2): :data:`PACKINGS` names the two layouts,
and :func:`pack`/:func:`unpack`/:func:`nbytes` take the layout. Unpacking checks that every stored
value is a code of the grid (a 2-bit field holding 3, a trit byte above 242), so a payload written
at another width or layout than its header says fails loudly instead of decoding to wrong weights.
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


def _check_unsigned(unsigned: np.ndarray, bits: int) -> None:
    """Every stored value must be a grid code: the top n-bit pattern (2q + 1) is none for n >= 2."""
    top = 1 if bits == 1 else 2 * qmax(bits)
    if unsigned.size and int(unsigned.max()) > top:
        raise ValueError(f"stored value {int(unsigned.max())} is not a {bits}-bit code (largest {top}); "
                         f"the data was written at another width or layout than declared")


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
    _check_unsigned(unsigned, bits)
    if bits == 1:
        return (unsigned * 2 - 1).astype(np.int8)
    return (unsigned - _offset(bits)).astype(np.int8)


# ------------------------------------------------------------------------------ ternary as trits
#: code layouts: ``bits`` (n bits per code, any width) and ``trits`` (2-bit/ternary only, 5 per byte)
PACKINGS = ("bits", "trits")
TRITS_PER_BYTE = 5
_TRIT_POWERS = 3 ** np.arange(TRITS_PER_BYTE, dtype=np.int16)


def trit_nbytes(numel: int) -> int:
    return (numel + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def pack_trits(codes: np.ndarray) -> bytes:
    """Ternary codes {-1, 0, +1}, five per byte (base 3, first code least significant)."""
    flat = np.asarray(codes, dtype=np.int16).reshape(-1)
    if flat.size and (flat.min() < -1 or flat.max() > 1):
        raise ValueError("ternary codes must lie in [-1, 1]")
    pad = (-flat.size) % TRITS_PER_BYTE
    digits = np.concatenate([flat + 1, np.zeros(pad, dtype=np.int16)]).reshape(-1, TRITS_PER_BYTE)
    return (digits * _TRIT_POWERS).sum(axis=1).astype(np.uint8).tobytes()


def unpack_trits(data: bytes, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_trits`: int8 codes of length ``numel``."""
    if len(data) != trit_nbytes(numel):
        raise ValueError(f"expected {trit_nbytes(numel)} bytes for {numel} trit-packed codes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8).astype(np.int16)
    if raw.size and int(raw.max()) >= 3 ** TRITS_PER_BYTE:
        raise ValueError(f"stored byte {int(raw.max())} is not five trits (largest 242); the data was written at "
                         f"another width or layout than declared")
    digits = (raw[:, None] // _TRIT_POWERS) % 3
    return (digits.reshape(-1)[:numel] - 1).astype(np.int8)


def check_packing(packing: str, bits: int) -> str:
    """Validate a layout for a width (``trits`` holds ternary codes, i.e. 2-bit grids, only)."""
    if packing not in PACKINGS:
        raise ValueError(f"unknown code packing {packing!r}; allowed: {list(PACKINGS)}")
    if packing == "trits" and bits != 2:
        raise ValueError(f"trit packing holds ternary (2-bit) codes, not {bits}-bit ones")
    return packing


def nbytes(numel: int, bits: int, packing: str = "bits") -> int:
    """Bytes of ``numel`` codes of width ``bits`` in layout ``packing``."""
    check_packing(packing, bits)
    return trit_nbytes(numel) if packing == "trits" else packed_nbytes(numel, bits)


def pack(codes: np.ndarray, bits: int, packing: str = "bits") -> bytes:
    check_packing(packing, bits)
    return pack_trits(codes) if packing == "trits" else pack_codes(codes, bits)


def unpack(data: bytes, bits: int, numel: int, packing: str = "bits") -> np.ndarray:
    check_packing(packing, bits)
    return unpack_trits(data, numel) if packing == "trits" else unpack_codes(data, bits, numel)
