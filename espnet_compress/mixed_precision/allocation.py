"""Per-layer bit widths under a size budget, solved exactly on the Pareto frontier (eq. 8).

Problem (eq. 8 of the lossless 4-bit Conformer paper): choose a width ``n_i`` for every quantizable
sub-layer ``i`` to minimise the summed sensitivity ``sum_i Omega_i(n_i)`` subject to
``sum_i N_i n_i <= S`` (``N_i`` weights of layer ``i``). It is a multiple-choice knapsack; we solve
it exactly with the dynamic programme the paper cites (ZeroQ): walk the layers, keeping the set of
partial allocations that are *Pareto optimal* in (size, sensitivity), i.e. no other partial
allocation of the same layers is both smaller-or-equal and less-or-equally sensitive. A point
dropped there can never become part of an optimum (replace it by its dominator in any completion),
so the final set is the exact frontier: for every budget, the best allocation is the frontier's
last point that fits. Returning the whole frontier (not one point) is what lets a user see the
trade-off and pick several systems from one solve.

Why numpy and no cost grid: sizes are exact integers (bits), so "equal size" is exact; each layer
step is a vectorised merge (concatenate the shifted copies, sort, keep strictly improving points),
and the work is proportional to the frontier, which grows only where the layers' sizes can add up
to new totals. A dense table over every possible size (the textbook knapsack) would need one entry
per bit of the model.

Full precision is a candidate only when the sensitivity table has the width ``0`` (32 bits per
weight, ``Omega = 0``); the default candidates are the paper's quantized widths.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from espnet_compress.quant.quantizers import check_bits

#: storage cost of a weight kept in full precision (width 0)
FP_BITS = 32


class AllocationError(ValueError):
    """A budget or a set of widths the allocation cannot honour; the message says which and why."""


def storage_bits(width: int) -> int:
    """Bits one weight costs at ``width`` (0 = full precision = 32)."""
    return FP_BITS if width == 0 else width


@dataclasses.dataclass(frozen=True)
class Budget:
    """A size limit on the quantizable weights, in one of the units users think in.

    ``avg_bits``: average bits per quantizable weight (``sum N_i n_i / sum N_i``); ``bytes``: bytes
    of their integer codes (``sum N_i n_i / 8``; scales, biases and fp tensors are not counted, as
    in the paper's ``S_target``); ``bits``: total bits.
    """

    value: float
    unit: str = "avg_bits"

    UNITS = ("avg_bits", "bytes", "bits")

    def __post_init__(self) -> None:
        if self.unit not in self.UNITS:
            raise AllocationError(f"budget unit '{self.unit}' unknown; allowed: {list(self.UNITS)}")
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool) or not math.isfinite(self.value) \
                or self.value <= 0:
            raise AllocationError(f"budget must be a positive number of {self.unit}, got {self.value!r}")

    def total_bits(self, num_weights: int) -> int:
        """The limit as total bits of the ``num_weights`` quantizable weights (rounded down)."""
        if self.unit == "avg_bits":
            return int(math.floor(self.value * num_weights + 1e-9))
        if self.unit == "bytes":
            return int(math.floor(self.value * 8 + 1e-9))
        return int(math.floor(self.value + 1e-9))

    def describe(self) -> str:
        return {"avg_bits": f"{self.value:g} average bits", "bytes": f"{self.value:,.0f} bytes",
                "bits": f"{self.value:,.0f} bits"}[self.unit]


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One point: a width per layer, its total size in bits and its summed sensitivity."""

    bits: Dict[str, int]
    total_bits: int
    omega: float
    num_weights: int

    @property
    def avg_bits(self) -> float:
        return self.total_bits / self.num_weights

    @property
    def bytes(self) -> float:
        return self.total_bits / 8


@dataclasses.dataclass(frozen=True)
class Problem:
    """What eq. 8 needs: layer names, weights per layer ``N_i`` and ``Omega_i(n)`` per width.

    Attributes:
        names: layer (module) names, in a fixed order.
        params: ``N_i``, one per layer.
        widths: candidate widths, the columns of ``omega`` (0 = full precision).
        omega: ``(len(names), len(widths))`` sensitivities; ``nan`` = width not allowed there.
    """

    names: Tuple[str, ...]
    params: Tuple[int, ...]
    widths: Tuple[int, ...]
    omega: np.ndarray

    def __post_init__(self) -> None:
        if not self.names:
            raise AllocationError("no layers to allocate bits to")
        if len(set(self.names)) != len(self.names):
            raise AllocationError("layer names must be unique")
        if len(self.params) != len(self.names) or any(int(p) <= 0 for p in self.params):
            raise AllocationError("params must give a positive weight count for every layer")
        if not self.widths:
            raise AllocationError("no candidate widths")
        for w in self.widths:
            check_bits(w, "candidate widths")
        if len(set(self.widths)) != len(self.widths):
            raise AllocationError(f"candidate widths repeat: {list(self.widths)}")
        omega = np.asarray(self.omega, dtype=np.float64)
        if omega.shape != (len(self.names), len(self.widths)):
            raise AllocationError(f"omega has shape {omega.shape}, expected {(len(self.names), len(self.widths))}")
        usable = ~np.isnan(omega)
        if (omega[usable] < 0).any() or np.isinf(omega).any():
            raise AllocationError("sensitivities must be finite and >= 0 (a KL divergence)")
        empty = [n for n, row in zip(self.names, usable) if not row.any()]
        if empty:
            raise AllocationError(f"layer '{empty[0]}' has no allowed width")
        object.__setattr__(self, "omega", omega)

    @property
    def num_weights(self) -> int:
        return int(sum(self.params))

    def column(self, width: int) -> int:
        """Index of ``width`` in :attr:`widths`; an unknown width is an error naming the known ones."""
        check_bits(width, "width")
        if width not in self.widths:
            raise AllocationError(f"width {width} was not measured; the sensitivity table has {list(self.widths)}")
        return self.widths.index(width)

    def restrict(self, widths: Sequence[int]) -> "Problem":
        """The same problem with only ``widths`` as candidates (each must be in the table)."""
        cols = [self.column(w) for w in widths]
        return dataclasses.replace(self, widths=tuple(widths), omega=self.omega[:, cols])

    def uniform(self, width: int) -> Allocation:
        """Every layer at ``width``."""
        col = self.column(width)
        bits = {n: width for n in self.names}
        return Allocation(bits, self.size_bits(bits), float(np.nansum(self.omega[:, col])), self.num_weights)

    def size_bits(self, bits: Mapping[str, int]) -> int:
        return int(sum(p * storage_bits(bits[n]) for n, p in zip(self.names, self.params)))

    def omega_of(self, bits: Mapping[str, int]) -> float:
        """``sum_i Omega_i(n_i)`` of an allocation (every width must be in the table)."""
        return float(sum(self.omega[i, self.column(bits[n])] for i, n in enumerate(self.names)))

    @classmethod
    def shape_only(cls, params: Mapping[str, int], widths: Sequence[int]) -> "Problem":
        """A problem with the layers' sizes but no sensitivities yet (all zero): enough for
        :meth:`check_budget`, so a caller can refuse a budget before minutes of measuring."""
        return cls(tuple(params), tuple(params.values()), tuple(widths), np.zeros((len(params), len(widths))))

    def check_budget(self, budget: Budget) -> int:
        """The budget as total bits; :class:`AllocationError` for a budget below the
        all-smallest-width size (nothing fits) or above the full-precision size (no compression
        asked for). Needs no sensitivities, so a caller can check before measuring them."""
        limit = budget.total_bits(self.num_weights)
        smallest, full = self.bounds()
        n = self.num_weights
        if limit < smallest:
            raise AllocationError(
                f"budget {budget.describe()} is below the smallest model the widths allow "
                f"({smallest / n:.4g} average bits = {smallest / 8:,.0f} bytes with every layer at its smallest width "
                f"{min(self.widths)}); raise the budget or add a smaller width")
        if limit > full:
            raise AllocationError(
                f"budget {budget.describe()} is above full precision ({FP_BITS} average bits = {full / 8:,.0f} bytes "
                f"for {n:,} weights): there is nothing to compress")
        return limit

    def bounds(self) -> Tuple[int, int]:
        """(size with every layer at its smallest allowed width, size of the fp model) in bits."""
        smallest = 0
        for i, p in enumerate(self.params):
            smallest += int(p) * min(storage_bits(w) for w, ok in zip(self.widths, ~np.isnan(self.omega[i])) if ok)
        return smallest, self.num_weights * FP_BITS


@dataclasses.dataclass(frozen=True)
class Frontier:
    """The exact Pareto frontier of a :class:`Problem`: sizes ascending, sensitivities strictly
    descending; :meth:`point` rebuilds the allocation of any point from the stored back-pointers."""

    problem: Problem
    total_bits: np.ndarray
    omega: np.ndarray
    #: per solve step: (index of the point in the previous step's frontier, column of the width chosen)
    _back: Tuple[Tuple[np.ndarray, np.ndarray], ...]
    #: layer index solved at each step
    order: Tuple[int, ...]

    def __len__(self) -> int:
        return len(self.total_bits)

    def point(self, k: int) -> Allocation:
        """The allocation of frontier point ``k`` (walks the back-pointers from the last layer solved)."""
        p = self.problem
        widths: List[int] = [0] * len(p.names)
        idx = int(k)
        for step in range(len(self.order) - 1, -1, -1):
            parent, col = self._back[step]
            widths[self.order[step]] = p.widths[int(col[idx])]
            idx = int(parent[idx])
        return Allocation(dict(zip(p.names, widths)), int(self.total_bits[k]), float(self.omega[k]), p.num_weights)

    def points(self) -> List[Allocation]:
        """Every point of the frontier, smallest first."""
        return [self.point(k) for k in range(len(self))]

    def best_under(self, budget: Budget) -> Allocation:
        """The least sensitive allocation whose size fits ``budget`` (checked by
        :meth:`Problem.check_budget`)."""
        limit = self.problem.check_budget(budget)
        k = int(np.searchsorted(self.total_bits, limit, side="right")) - 1
        return self.point(k)


def solve(problem: Problem) -> Frontier:
    """The exact Pareto frontier of eq. 8 by dynamic programming over the layers.

    Layers are added largest first (small layers only refine the sizes reached, so the frontier
    stays coarse as long as possible; the result does not depend on the order)."""
    order = sorted(range(len(problem.names)), key=lambda i: -int(problem.params[i]))
    costs = np.zeros(1, dtype=np.int64)
    omega = np.zeros(1, dtype=np.float64)
    back: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    widths_bits = np.array([storage_bits(w) for w in problem.widths], dtype=np.int64)
    for layer in order:
        cols = np.flatnonzero(~np.isnan(problem.omega[layer]))
        step_cost = int(problem.params[layer]) * widths_bits[cols]
        cand_cost = (costs[None, :] + step_cost[:, None]).ravel()
        cand_omega = (omega[None, :] + problem.omega[layer, cols][:, None]).ravel()
        cand_parent = np.tile(np.arange(len(costs)), len(cols))
        cand_col = np.repeat(cols, len(costs))
        sort = np.lexsort((cand_omega, cand_cost))
        cand_cost, cand_omega = cand_cost[sort], cand_omega[sort]
        # a point survives if it is strictly less sensitive than every cheaper-or-equal point before it
        best_before = np.minimum.accumulate(cand_omega)
        keep = np.empty(len(cand_omega), dtype=bool)
        keep[0] = True
        keep[1:] = cand_omega[1:] < best_before[:-1]
        keep &= np.r_[True, cand_cost[1:] != cand_cost[:-1]]
        chosen = sort[keep]
        costs, omega = cand_cost[keep], cand_omega[keep]
        back[layer] = (cand_parent[chosen], cand_col[chosen])
    return Frontier(problem, costs, omega, tuple(back[i] for i in order), tuple(order))


def allocate(problem: Problem, budget: Budget) -> Tuple[Allocation, Frontier]:
    """The optimal allocation under ``budget`` and the whole frontier it was picked from."""
    frontier = solve(problem)
    return frontier.best_under(budget), frontier


def allocate_nested(problem: Problem, budgets: Sequence[Budget], monotonic: bool = True) -> List[Allocation]:
    """Allocations for several systems of one nested supernet, smallest budget first.

    With ``monotonic`` a larger system never gives a layer fewer bits than a smaller one (the
    systems share weights, so a layer the small system keeps at 6 bits should not drop to 4 in a
    bigger one). Solved system by system in ascending budget: the smallest is the exact optimum
    of its budget, each next one the exact optimum among allocations at least as wide as the
    previous system's, layer by layer (the joint optimum over all systems is not searched). Every
    step is feasible: the previous allocation itself fits the larger budget.
    """
    if not budgets:
        raise AllocationError("no budgets given")
    n = problem.num_weights
    order = sorted(range(len(budgets)), key=lambda k: budgets[k].total_bits(n))
    out: Dict[int, Allocation] = {}
    previous: Optional[Allocation] = None
    for k in order:
        current = problem
        if monotonic and previous is not None:
            omega = problem.omega.copy()
            for i, name in enumerate(problem.names):
                floor = storage_bits(previous.bits[name])
                for j, w in enumerate(problem.widths):
                    if storage_bits(w) < floor:
                        omega[i, j] = np.nan
            current = dataclasses.replace(problem, omega=omega)
        alloc = solve(current).best_under(budgets[k])
        if monotonic and previous is not None:  # report Omega on the unrestricted table (same values)
            alloc = dataclasses.replace(alloc, omega=problem.omega_of(alloc.bits))
        out[k] = previous = alloc
    return [out[k] for k in range(len(budgets))]
