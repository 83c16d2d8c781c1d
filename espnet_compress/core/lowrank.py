"""Low-rank factorised linear layers and the semi-orthogonal constraint (Povey et al., 2018).

A weight ``W`` (out x in) is replaced by ``A @ B`` with ``B`` (rank x in, the *projection*) and ``A``
(out x rank, the *affine* part, which carries the bias), as in TDNN-F. The rank is the bottleneck the
DARTS search of the lossless-4bit paper chooses per FFN (:mod:`espnet_compress.features.search`).
Bottleneck candidates are nested prefixes of one factorisation: the ``k``-dim bottleneck keeps the
first ``k`` rows of ``B`` and columns of ``A``, so a mixture over bottlenecks is one mask on the
bottleneck units.

The constraint keeps one factor semi-orthogonal (``M Mᵀ = I`` for a wide matrix, ``Mᵀ M = I`` for a
tall one) by Povey's periodic update after the optimiser's steps rather than by a
reparametrisation: the factor trains freely and is pulled back every few steps, which is what the
paper's "SLLS" systems use (Kaldi's ``ConstrainOrthonormal``). Because the rows of a semi-orthogonal
``B`` are orthonormal, every prefix of it (every narrower bottleneck) is semi-orthogonal too.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

#: positions of the four factors of a factorised two-layer FFN in the paper's notation ("SLLS"):
#: first layer's projection and affine part, second layer's projection and affine part
FACTOR_POSITIONS = (("first", "proj"), ("first", "affine"), ("second", "proj"), ("second", "affine"))


class LowRankLinear(torch.nn.Module):
    """``y = affine(proj(x))``: a ``out_features x in_features`` linear map of rank ``rank``.

    ``proj`` (``B``, no bias) maps to the bottleneck, ``affine`` (``A``, with the layer's bias) maps
    out of it. ``forward(x, mask)`` scales the bottleneck units by ``mask`` (the search's mixture
    over nested bottleneck sizes); ``None`` uses all of them.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} must be in 1..{min(in_features, out_features)} for a "
                             f"{out_features}x{in_features} layer")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.proj = torch.nn.Linear(in_features, rank, bias=False)
        self.affine = torch.nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.proj(x)
        if mask is not None:
            h = h * mask
        return self.affine(h)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factor(layer: LowRankLinear, which: str) -> torch.nn.Parameter:
    """The weight of ``layer.proj`` (``which="proj"``) or ``layer.affine`` (``"affine"``)."""
    return getattr(layer, which).weight


def semi_orthogonal_init_(weight: torch.Tensor) -> torch.Tensor:
    """Initialise ``weight`` semi-orthogonal (orthonormal rows or columns, whichever are fewer)."""
    with torch.no_grad():
        return torch.nn.init.orthogonal_(weight)


@torch.no_grad()
def semi_orthogonal_step_(weight: torch.Tensor, scale: float = 1.0) -> float:
    """One update of Povey et al. (2018), eq. (5)-(7), in place: ``M <- M - 4 nu (M Mᵀ - s² I) M / s²``.

    ``M`` is ``weight`` if it has no more rows than columns, else its transpose (a view, so the
    update lands in ``weight``). ``nu`` is 1/8, Kaldi's rate that converges quadratically near the
    constraint, halved (twice) when the eigenvalues of ``M Mᵀ`` are spread (Kaldi's safeguard, so a
    factor far from the constraint does not diverge). Returns ``||M Mᵀ - s² I||_F`` before the
    update, the distance the caller may log.
    """
    m = weight if weight.shape[0] <= weight.shape[1] else weight.t()
    p = m @ m.t()
    trace_p = torch.trace(p)
    trace_pp = (p * p).sum()
    ratio = float(trace_pp * p.shape[0] / trace_p.clamp(min=1e-20) ** 2)
    speed = 0.125
    if ratio > 1.02:
        speed *= 0.5
        if ratio > 1.1:
            speed *= 0.5
    p.diagonal().sub_(scale * scale)
    distance = float(torch.linalg.matrix_norm(p))
    m.add_(p @ m, alpha=-4.0 * speed / (scale * scale))
    return distance


@torch.no_grad()
def svd_factors(weight: torch.Tensor, rank: int, constrained: Tuple[bool, bool]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(proj, affine)`` of shapes ``rank x in`` and ``out x rank`` whose product is the best rank-``rank``
    approximation of ``weight`` (``out x in``; Eckart-Young), for warm-starting a factorised layer from a
    trained dense one.

    Why the SVD and not any factorisation: its bottleneck units are ordered by singular value, so every
    prefix of ``k`` units is itself the best rank-``k`` approximation -- exactly what nested bottleneck
    candidates (the first ``k`` rows of ``proj``) need. ``constrained`` says which factor is kept
    semi-orthogonal (``(proj, affine)``, from the ``semi_orthogonal`` letters): that factor gets the
    orthonormal singular vectors, so it starts on the constraint, and the other one carries the singular
    values; with both or neither constrained each gets their square roots.
    """
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank {rank} must be in 1..{min(weight.shape)} for a {tuple(weight.shape)} weight")
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    proj_orth, affine_orth = constrained
    if proj_orth and not affine_orth:
        proj, affine = vh, u * s
    elif affine_orth and not proj_orth:
        proj, affine = s[:, None] * vh, u
    else:
        root = s.sqrt()
        proj, affine = root[:, None] * vh, u * root
    return proj.to(weight.dtype), affine.to(weight.dtype)


def semi_orthogonality_error(weight: torch.Tensor) -> float:
    """``||M Mᵀ - I||_F`` for the short side of ``weight`` (0 for an exactly semi-orthogonal factor)."""
    weight = weight.detach()
    m = weight if weight.shape[0] <= weight.shape[1] else weight.t()
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return float(torch.linalg.matrix_norm(m @ m.t() - eye))
