"""Foldable configuration of any elastic encoder: its physical blocks unfolded to a logical depth.

Unfolding is an execution plan that repeats blocks, so the parameters (and optimizer state) are
those of the seed whatever the depth. Plans may be given as ``{depth: d}`` (the default path to
``d``), ``{depth: d, path_index: i}`` (the i-th of
:func:`~espnet_compress.core.fold.enumerate_paths`) or explicit ``{blocks: [...]}``, which must obey
the unfolding rule. ``ESPNET_COMPRESS_PLAN='{"depth": 6}'`` picks depth/path at decode time.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from espnet_compress.core.fold import ORDERS, FoldError, check_path, default_path, enumerate_paths
from espnet_compress.core.plan import ExecutionPlan, PlanError
from espnet_compress.encoders.elastic import PlanLike

FOLD_FIELDS = ("depth", "order", "unfold_last")


class FoldableEncoder:
    """Mixin (listed before the elastic host class): ``fold`` options ``depth`` (default logical
    depth, default: the number of physical blocks), ``order`` (``in_place`` | ``cycle``, how
    repeats run) and ``unfold_last`` (only the last m blocks may repeat; default all)."""

    def __init__(self, *args: Any, fold: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> None:
        fold = dict(fold or {})
        unknown = sorted(set(fold) - set(FOLD_FIELDS))
        if unknown:
            raise FoldError(f"encoder_conf.fold: unknown option(s) {unknown}; allowed: {list(FOLD_FIELDS)}")
        self.fold_order: str = fold.get("order", "in_place")
        if self.fold_order not in ORDERS:
            raise FoldError(f"encoder_conf.fold.order: unknown order '{self.fold_order}'; allowed: {list(ORDERS)}")
        self.unfold_last: Optional[int] = fold.get("unfold_last")
        self._fold_depth: Optional[int] = fold.get("depth")
        super().__init__(*args, **kwargs)

    def _default_plan(self, plan: PlanLike) -> PlanLike:
        if plan is not None:
            return plan
        depth = self.num_physical_blocks if self._fold_depth is None else self._fold_depth
        return {"depth": depth, "name": f"depth{depth}"}

    def paths(self, depth: int) -> List[Tuple[int, ...]]:
        """All unfolding paths to ``depth`` allowed by the rule and this encoder's options."""
        return enumerate_paths(self.num_physical_blocks, depth, self.fold_order, self.unfold_last)

    def check_plan(self, plan: PlanLike, name: str = "plan") -> ExecutionPlan:
        """Resolve ``depth``/``path_index`` to blocks and enforce the unfolding rule."""
        if isinstance(plan, Mapping) and ("depth" in plan or "path_index" in plan):
            plan = self._resolve_depth(dict(plan), name)
        resolved = super().check_plan(plan, name)
        try:
            check_path(resolved.blocks, self.num_physical_blocks, self.unfold_last)
        except FoldError as err:
            raise PlanError(f"plan '{resolved.name}': {err}") from None
        return resolved

    def _resolve_depth(self, conf: Dict[str, Any], name: str) -> Dict[str, Any]:
        name = str(conf.get("name", name))
        if "blocks" in conf:
            raise PlanError(f"plan '{name}': give either 'depth' or 'blocks', not both")
        depth = conf.pop("depth", self.num_physical_blocks)
        index = conf.pop("path_index", None)
        try:
            if index is None:
                conf["blocks"] = list(default_path(self.num_physical_blocks, depth, self.fold_order, self.unfold_last))
            else:
                options = self.paths(depth)
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(options):
                    raise FoldError(f"path_index {index!r} is out of range: depth {depth} has {len(options)} paths")
                conf["blocks"] = list(options[index])
        except FoldError as err:
            raise PlanError(f"plan '{name}': {err}") from None
        return conf
