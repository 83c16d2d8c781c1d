"""Unfolding paths: how ``n_p`` physical blocks are reused to reach a logical depth.

The foldable-model paper's rule: a block may be used ``k + 1`` times only when every other block
is used ``k`` or ``k + 1`` times, i.e. use counts differ by at most one. A path to depth ``d`` is
therefore fixed by *which* blocks take the extra use (``C(n_p, d mod n_p)`` choices; 6 -> 8 gives
15) and by the order in which repeats run:

* ``in_place`` (default): each block repeats immediately (``0 0 1 1 2 ...``). A repeated block
  refines its own output, so every prefix of the path is itself a valid shallower model and the
  seed's block order is kept; this is the paper's Fig. 1 picture.
* ``cycle``: the whole stack runs again (``0 1 2 0 1 2``), ALBERT-style weight sharing.

``unfold_last=m`` restricts repeats to the last ``m`` blocks (the paper's 8 -> 12 case).
"""
from __future__ import annotations

import itertools
from typing import Iterator, List, Optional, Sequence, Tuple

ORDERS = ("in_place", "cycle")


class FoldError(ValueError):
    """A depth or path that the folding rule does not allow; the message names the problem."""


def _unfoldable(n_p: int, unfold_last: Optional[int]) -> List[int]:
    if unfold_last is None:
        return list(range(n_p))
    if not 1 <= unfold_last <= n_p:
        raise FoldError(f"unfold_last must be in 1..{n_p} (the number of physical blocks), got {unfold_last}")
    return list(range(n_p - unfold_last, n_p))


def _check_depth(n_p: int, depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise FoldError(f"depth must be an integer, got {depth!r}")
    if depth < n_p:
        raise FoldError(
            f"depth {depth} is below the {n_p} physical blocks; a foldable model runs every physical "
            f"block at least once (skip blocks with an explicit 'blocks' plan instead)"
        )


def _sequence(counts: Sequence[int], order: str) -> Tuple[int, ...]:
    if order == "in_place":
        return tuple(b for b, c in enumerate(counts) for _ in range(c))
    return tuple(b for r in range(max(counts)) for b, c in enumerate(counts) if c > r)


def enumerate_paths(n_p: int, depth: int, order: str = "in_place",
                    unfold_last: Optional[int] = None) -> List[Tuple[int, ...]]:
    """Every path allowed by the rule, in a fixed order (extra uses on later blocks come first)."""
    return list(_iter_paths(n_p, depth, order, unfold_last))


def _iter_paths(n_p: int, depth: int, order: str, unfold_last: Optional[int]) -> Iterator[Tuple[int, ...]]:
    if order not in ORDERS:
        raise FoldError(f"unknown order '{order}'; allowed: {list(ORDERS)}")
    _check_depth(n_p, depth)
    free = _unfoldable(n_p, unfold_last)
    fixed = n_p - len(free)
    base, extra = divmod(depth - fixed, len(free))
    for chosen in itertools.combinations(reversed(free), extra):
        counts = [1] * n_p
        for b in free:
            counts[b] = base + (1 if b in chosen else 0)
        yield _sequence(counts, order)


def default_path(n_p: int, depth: int, order: str = "in_place", unfold_last: Optional[int] = None) -> Tuple[int, ...]:
    """The path used when only a depth is given: extra uses go to the last blocks."""
    return next(_iter_paths(n_p, depth, order, unfold_last))


def check_path(path: Sequence[int], n_p: int, unfold_last: Optional[int] = None) -> Tuple[int, ...]:
    """Validate an explicit path against the rule (any order of the uses is accepted)."""
    path = tuple(path)
    missing = [b for b in path if not 0 <= b < n_p]
    if missing:
        raise FoldError(f"path names block {missing[0]}, but the seed has blocks 0..{n_p - 1}")
    _check_depth(n_p, len(path))
    counts = [path.count(b) for b in range(n_p)]
    free = set(_unfoldable(n_p, unfold_last))
    pinned = [b for b in range(n_p) if b not in free and counts[b] != 1]
    if pinned:
        raise FoldError(f"path uses block {pinned[0]} {counts[pinned[0]]} times, but only the last "
                        f"{unfold_last} blocks may be unfolded")
    free_counts = [counts[b] for b in sorted(free)]
    if max(free_counts) - min(free_counts) > 1:
        hi = max(free, key=lambda b: counts[b])
        lo = min(free, key=lambda b: counts[b])
        raise FoldError(
            f"path breaks the unfolding rule: block {hi} is used {counts[hi]} times while block {lo} "
            f"is used {counts[lo]} times (use counts may differ by at most one)"
        )
    return path
