"""``fold``: the encoder's physical blocks unfolded to a logical depth (the foldable-model paper).

Unfolding is an execution plan that repeats blocks, so the parameters (and optimizer state) are
those of the seed whatever the depth. Plans and systems may give ``{depth: d}`` (the default path
to ``d``), ``{depth: d, path_index: i}`` (the i-th of
:func:`~espnet_compress.core.fold.enumerate_paths`) or explicit ``{blocks: [...]}``, which must obey
the unfolding rule. ``ESPNET_COMPRESS_PLAN='{"depth": 6}'`` picks depth/path at decode time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from espnet_compress.core.fold import ORDERS, FoldError, check_path, default_path, enumerate_paths
from espnet_compress.core.plan import ExecutionPlan, PlanError
from espnet_compress.features.base import EncoderFeature

if TYPE_CHECKING:
    from espnet_compress.encoders.elastic import ElasticEncoder

FOLD_FIELDS = ("depth", "order", "unfold_last")


class FoldFeature(EncoderFeature):
    """``fold`` options: ``depth`` (default logical depth, default: the number of physical blocks),
    ``order`` (``in_place`` | ``cycle``, how repeats run) and ``unfold_last`` (only the last m
    blocks may repeat; default all)."""

    KEY = "fold"
    PLAN_KEYS = ("depth", "path_index")

    def __init__(self, conf: Optional[Mapping[str, Any]], where: str) -> None:
        super().__init__(conf, where)
        unknown = sorted(set(self.conf) - set(FOLD_FIELDS))
        if unknown:
            raise FoldError(f"{where}: unknown option(s) {unknown}; allowed: {list(FOLD_FIELDS)}")
        self.order: str = self.conf.get("order", "in_place")
        if self.order not in ORDERS:
            raise FoldError(f"{where}.order: unknown order '{self.order}'; allowed: {list(ORDERS)}")
        self.unfold_last: Optional[int] = self.conf.get("unfold_last")
        self.depth: Optional[int] = self.conf.get("depth")

    def paths(self, encoder: "ElasticEncoder", depth: int) -> List[Tuple[int, ...]]:
        """All unfolding paths to ``depth`` allowed by the rule and these options."""
        return enumerate_paths(encoder.num_physical_blocks, depth, self.order, self.unfold_last)

    def attach(self, encoder: "ElasticEncoder") -> None:
        if self.depth is not None:  # fail at build time, naming the option
            try:
                default_path(encoder.num_physical_blocks, self.depth, self.order, self.unfold_last)
            except FoldError as err:
                raise FoldError(f"{self.where}.depth: {err}") from None

    def default_plan(self, encoder: "ElasticEncoder", plan: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if plan is not None and ("blocks" in plan or "depth" in plan):
            return plan
        depth = encoder.num_physical_blocks if self.depth is None else self.depth
        return dict(plan or {}, depth=depth, name=(plan or {}).get("name", f"depth{depth}"))

    def resolve(self, encoder: "ElasticEncoder", conf: Dict[str, Any], name: str) -> Dict[str, Any]:
        if "depth" not in conf and "path_index" not in conf:
            return conf
        conf = dict(conf)
        name = str(conf.get("name", name))
        if "blocks" in conf:
            raise PlanError(f"plan '{name}': give either 'depth' or 'blocks', not both")
        depth = conf.pop("depth", encoder.num_physical_blocks)
        index = conf.pop("path_index", None)
        try:
            if index is None:
                conf["blocks"] = list(default_path(encoder.num_physical_blocks, depth, self.order, self.unfold_last))
            else:
                options = self.paths(encoder, depth)
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(options):
                    raise FoldError(f"path_index {index!r} is out of range: depth {depth} has {len(options)} paths")
                conf["blocks"] = list(options[index])
        except FoldError as err:
            raise PlanError(f"plan '{name}': {err}") from None
        return conf

    def check(self, encoder: "ElasticEncoder", plan: ExecutionPlan) -> None:
        try:
            check_path(plan.blocks, encoder.num_physical_blocks, self.unfold_last)
        except FoldError as err:
            raise PlanError(f"plan '{plan.name}': {err}") from None
