"""``foldable_conformer``: a seed of ``num_blocks`` physical blocks unfolded to a logical depth.

A configuration of the elastic core: unfolding is an execution plan that repeats blocks, so the
parameters (and optimizer state) are those of the seed whatever the depth. Plans may be given as
``{depth: d}`` (the default path to ``d``), ``{depth: d, path_index: i}`` (the i-th of
:func:`~espnet_compress.core.fold.enumerate_paths`) or explicit ``{blocks: [...]}``, which must obey
the unfolding rule. ``ESPNET_COMPRESS_PLAN='{"depth": 6}'`` picks depth/path at decode time.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from espnet_compress.core.fold import ORDERS, FoldError, check_path, default_path, enumerate_paths
from espnet_compress.core.plan import ExecutionPlan, PlanError
from espnet_compress.encoders.elastic_conformer import ElasticConformerEncoder, PlanLike
from espnet_compress.utils.signature import merge_signature

FOLD_FIELDS = ("depth", "order", "unfold_last")


@merge_signature(ElasticConformerEncoder.__init__, skip=("self", "input_size"))
class FoldableConformerEncoder(ElasticConformerEncoder):
    """Conformer encoder whose ``num_blocks`` physical blocks are reused to any logical depth.

    Args:
        input_size: input feature dimension (given by ESPnet).
        fold: ``depth`` (default logical depth, default ``num_blocks``), ``order``
            (``in_place`` | ``cycle``, how repeats run) and ``unfold_last`` (only the last m blocks
            may repeat; default all).
        plan: default plan (overrides ``fold.depth``); accepts ``depth``/``path_index``.
        **conformer_kwargs: ESPnet ``ConformerEncoder`` options (``num_blocks`` = seed size).
    """

    def __init__(self, input_size: int, fold: Optional[Mapping[str, Any]] = None, plan: PlanLike = None,
                 **conformer_kwargs: Any) -> None:
        fold = dict(fold or {})
        unknown = sorted(set(fold) - set(FOLD_FIELDS))
        if unknown:
            raise FoldError(f"encoder_conf.fold: unknown option(s) {unknown}; allowed: {list(FOLD_FIELDS)}")
        self.fold_order: str = fold.get("order", "in_place")
        if self.fold_order not in ORDERS:
            raise FoldError(f"encoder_conf.fold.order: unknown order '{self.fold_order}'; allowed: {list(ORDERS)}")
        self.unfold_last: Optional[int] = fold.get("unfold_last")
        self._fold_depth: Optional[int] = fold.get("depth")
        super().__init__(input_size, plan=plan, **conformer_kwargs)

    def _default_plan(self, plan: PlanLike) -> PlanLike:
        if plan is not None:
            return plan
        depth = self.num_physical_blocks if self._fold_depth is None else self._fold_depth
        return {"depth": depth, "name": f"depth{depth}"}

    def paths(self, depth: int):
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
