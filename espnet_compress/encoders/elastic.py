"""The plan machinery every elastic encoder shares, whatever network it wraps.

An elastic encoder is a host encoder (ESPnet's Conformer, torchaudio's wav2vec2/HuBERT) whose block
container follows an :class:`~espnet_compress.core.plan.ExecutionPlan` and whose FFNs can be
narrowed. What a plan may ask (which blocks exist, how wide the FFNs are, which weights carry
quantizers at which widths), how a plan is switched per forward pass, what a plan costs, and how
systems share computation in one training step are the same for every host, so they live here
once; a host class only builds its network and calls :meth:`ElasticEncoder._init_elastic`.
Methods are *features* (:mod:`espnet_compress.features`): optional ``encoder_conf`` blocks
(``quant_conf``, ``fold``, ...) that every host accepts and that compose freely.
"""
from __future__ import annotations

import contextlib
import fnmatch
import inspect
import logging
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Type, Union

import torch

from espnet_compress.core.elastic import ElasticFFN, PlannedBlocks
from espnet_compress.core.norm_stats import SystemBatchNorm, is_batch_norm, norms_in
from espnet_compress.core.plan import ExecutionPlan, PlanError
from espnet_compress.core.sharing import SharedComputation, precision_signature
from espnet_compress.env import settings
from espnet_compress.features import FEATURES, EncoderFeature, feature_plan_keys
from espnet_compress.quant.api import QuantConfig, quantized_modules
from espnet_compress.quant.quantizers import UnsupportedBitWidth, check_bits
from espnet_compress.utils.params import count_parameters

log = logging.getLogger(__name__)

PlanLike = Union[None, Mapping[str, Any], ExecutionPlan]
#: keys of a plan mapping: the plan's own fields, then the ones features resolve (``depth``, ...)
PLAN_FIELDS = ExecutionPlan.CONFIG_FIELDS + feature_plan_keys()


def pop_features(options: Dict[str, Any]) -> Dict[str, Any]:
    """Take the feature blocks (``quant_conf``, ``fold``, ...) out of a host's options."""
    return {key: options.pop(key) for key in list(FEATURES) if key in options}


def with_feature_options(cls: type) -> type:
    """Class decorator (after ``merge_signature``): list every feature block as a keyword option
    of ``cls``, so ESPnet's ``--print_config`` shows them and unknown options are still refused."""
    sig = inspect.signature(cls.__init__)
    params = [p for p in sig.parameters.values()
              if p.name not in FEATURES and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    extra = [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None) for key in FEATURES]
    cls.__init__.__signature__ = sig.replace(parameters=params + extra)
    return cls


class ElasticEncoder:
    """Mixin for an ESPnet encoder whose forward follows an execution plan.

    Class attributes a host sets:
        FAMILY: the registered name's suffix (``conformer`` -> ``elastic_conformer``,
            ``quantized_conformer``, ...), used when a system is exported.
        SHAPE_OPTIONS: the host's own option names for (number of blocks, FFN hidden width), so
            an export can rewrite a config for the blocks and width a system keeps.
        STOCK_ENCODER: the stock ESPnet encoder name a full-precision, uniform system of this
            host exports to (loads without this plugin), or ``None`` if there is none.
    """

    FAMILY: str
    SHAPE_OPTIONS: Tuple[str, str]
    STOCK_ENCODER: Optional[str] = None
    #: encoder options that describe how the supernet was built, not what a standalone system is
    BUILD_ONLY_OPTIONS: Tuple[str, ...] = ("plan", *FEATURES)
    #: set by the ``quant_conf`` feature
    quant_config: Optional[QuantConfig] = None

    num_physical_blocks: int
    linear_units: int
    blocks_name: str
    _elastic_ffn: bool
    _input_memo: Optional[SharedComputation] = None
    _warned_stats: set

    def _init_elastic(self, blocks: torch.nn.Module, container: Type[PlannedBlocks], ffn: Type[ElasticFFN],
                      linear_units: int, plan: PlanLike, features: Mapping[str, Any],
                      layer_drop_rate: float = 0.0) -> None:
        """Make the built host elastic: convert its FFNs, norms and block container, switch the
        features on (``features``: their ``encoder_conf`` blocks; ``None`` = off), then install the
        default plan (each feature completes it) and apply ``ESPNET_COMPRESS_PLAN`` if set."""
        self.features: Dict[str, EncoderFeature] = {
            key: FEATURES[key](conf, f"encoder_conf.{key}") for key, conf in features.items() if conf is not None
        }
        self.blocks_name = next(n for n, m in self.named_modules() if m is blocks)
        self.num_physical_blocks = len(blocks)
        self.linear_units = linear_units
        ffns = [m for block in blocks for m in block.children() if type(m) is ffn.HOST]
        self._elastic_ffn = bool(ffns)
        for module in ffns:
            ffn.convert(module)
        for module in [m for m in blocks.modules() if is_batch_norm(m)]:
            SystemBatchNorm.convert(module)
        container.convert(blocks, ExecutionPlan.full(self.num_physical_blocks), layer_drop_rate)
        for feature in self.features.values():
            feature.attach(self)
        conf = plan.to_config() if isinstance(plan, ExecutionPlan) else (None if plan is None else dict(plan))
        for feature in self.features.values():
            conf = feature.default_plan(self, conf)
        self.default_plan = self.set_plan(conf)
        self.track_norm_stats({self.default_plan.name: self.default_plan}, self.default_plan.name)
        self.apply_env_plan()

    # ------------------------------------------------------------------ blocks
    @property
    def blocks(self) -> PlannedBlocks:
        """The plan-following block container (looked up, not stored: a second reference would
        register the blocks twice in ``state_dict``)."""
        return self.get_submodule(self.blocks_name)

    def block_name(self, index: int) -> str:
        """Module name (relative to the encoder) of physical block ``index``."""
        return f"{self.blocks_name}.{index}"

    # ------------------------------------------------------------------ plans
    def apply_env_plan(self) -> None:
        """Switch to the plan in ``ESPNET_COMPRESS_PLAN`` if it is set (validated like any plan).

        The environment variable (JSON, e.g. ``'{"blocks": [0, 1, 2]}'`` or, with ``fold``,
        ``'{"depth": 6}'``) lets stock programs such as ``asr_inference`` choose the plan at decode
        time without editing the config; training refuses it (:mod:`espnet_compress.env`).
        """
        conf = settings().plan
        if conf is not None:
            self.set_plan(conf)
            self.blocks.decode_env = True

    def check_plan(self, plan: PlanLike, name: str = "plan") -> ExecutionPlan:
        """Validate a plan against this encoder's physical shape and features (raises
        :class:`PlanError` naming the plan and the field)."""
        if isinstance(plan, Mapping):
            name = str(plan.get("name", name))
            unknown = sorted(set(plan) - set(PLAN_FIELDS))
            if unknown:
                raise PlanError(f"plan '{name}': unknown field(s) {unknown}; allowed: {list(PLAN_FIELDS)}")
            for key, cls in FEATURES.items():
                needs = [k for k in cls.PLAN_KEYS if k in plan]
                if needs and key not in self.features:
                    raise PlanError(f"plan '{name}': {needs} need the '{key}' feature (encoder_conf.{key}); "
                                    f"use 'blocks' to skip or repeat blocks without it")
            plan = dict(plan)
            for feature in self.features.values():
                plan = feature.resolve(self, plan, name)
        plan = ExecutionPlan.from_config(plan, self.num_physical_blocks, name=name)
        plan.validate(self.num_physical_blocks, self.linear_units)
        if plan.ffn_units is not None and not self._elastic_ffn and any(
            u != self.linear_units for u in plan.ffn_units
        ):
            raise PlanError(f"plan '{plan.name}': ffn_units needs linear FFNs (this encoder's FFNs cannot be narrowed)")
        for pattern, nbits in plan.bits:
            try:
                check_bits(nbits, f"plan '{plan.name}' bits['{pattern}']")
            except UnsupportedBitWidth as err:
                raise PlanError(str(err)) from None
        quantized = self.quantizable_modules()
        if any(b != 0 for _, b in plan.bits) and not quantized:
            raise PlanError(
                f"plan '{plan.name}': bits are set but this encoder has no quantized weights; "
                f"switch the quantization feature on (encoder_conf.quant_conf)"
            )
        for pattern, nbits in plan.bits:
            if nbits and quantized and not any(fnmatch.fnmatchcase(n, pattern) for n in quantized):
                raise PlanError(f"plan '{plan.name}': bits['{pattern}'] matches no quantized module of this "
                                f"encoder (e.g. '{next(iter(quantized))}')")
        for module_name, module in quantized.items():
            nbits = plan.bits_for(module_name)
            if nbits and nbits not in module.weight_quantizer.bit_choices:
                raise PlanError(
                    f"plan '{plan.name}': bits {nbits} for '{module_name}' is not among the widths its "
                    f"quantizer was built for {list(module.weight_quantizer.bit_choices)}; add it to "
                    f"quant_conf.bit_choices"
                )
        for feature in self.features.values():
            feature.check(self, plan)
        return plan

    @property
    def plan(self) -> ExecutionPlan:
        """The plan the next forward will run."""
        return self.blocks.plan

    def set_plan(self, plan: PlanLike) -> ExecutionPlan:
        """Make ``plan`` the active plan (validated) and set each quantized module's bit width."""
        plan = self.check_plan(plan)
        blocks = self.blocks
        if (blocks.stats_owner is not None and not blocks.has_own_stats(plan)
                and plan.name not in self._warned_stats and norms_in(blocks)):
            self._warned_stats.add(plan.name)
            log.warning("plan '%s' has no batch-norm statistics of its own; it normalises with those of "
                        "'%s' (declare it in model_conf.systems to train its own)", plan.name, blocks.stats_owner)
        blocks.plan = plan
        for module_name, module in self.quantizable_modules().items():
            module.set_bits(plan.bits_for(module_name))
        return plan

    @contextlib.contextmanager
    def using(self, plan: PlanLike) -> Iterator[ExecutionPlan]:
        """Run the body under ``plan``, then restore the previous plan (also on error)."""
        previous = self.plan
        try:
            yield self.set_plan(plan)
        finally:
            self.set_plan(previous)

    def track_norm_stats(self, plans: Mapping[str, ExecutionPlan], owner: str) -> None:
        """Keep batch-norm statistics per plan and per use of a block (see
        :mod:`~espnet_compress.core.norm_stats`); ``owner`` keeps the norms' own buffers."""
        self._warned_stats = set()
        self.blocks.track_norm_stats(dict(plans), owner)

    # ------------------------------------------------------------------ one step, many systems
    @contextlib.contextmanager
    def sharing(self, memo: SharedComputation) -> Iterator[SharedComputation]:
        """Within the body, forwards under different plans share identical sub-computations: the
        input layer (through :meth:`_shared_input`) and every planned step consult ``memo``, so a
        system whose plan starts like another's (same blocks, widths and precisions) reuses that
        prefix instead of recomputing it."""
        self._input_memo = memo
        self.blocks.memo = memo
        try:
            yield memo
        finally:
            self._input_memo = None
            self.blocks.memo = None

    def _shared_input(self, modules: Sequence[torch.nn.Module], fn: Callable[..., Any], *args: Any) -> Any:
        """Run the input layer ``fn(*args)`` (made of ``modules``), or reuse its output inside
        :meth:`sharing` when the modules' precisions and the inputs are the same."""
        if self._input_memo is None:
            return fn(*args)
        return self._input_memo(("input", tuple(precision_signature(m) for m in modules)), fn, *args)

    def feature_loss_terms(self, model: torch.nn.Module) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
        """The features' terms for the training loss (summed; ``None`` if none) and their stats,
        after a forward of ``model`` (see :meth:`EncoderFeature.loss_terms`)."""
        total: Optional[torch.Tensor] = None
        stats: Dict[str, Any] = {}
        for feature in self.features.values():
            term, more = feature.loss_terms(self, model)
            stats.update(more)
            if term is not None:
                total = term if total is None else total + term
        return total, stats

    # ------------------------------------------------------------------ weights and cost
    def quantizable_modules(self) -> Dict[str, torch.nn.Module]:
        """Modules whose weight precision a plan can set (they carry a quantizer), by name."""
        return quantized_modules(self)

    def physical_parameters(self) -> int:
        """Parameters stored for this encoder, independent of the plan (shared blocks count once;
        the project's one counting rule, :mod:`espnet_compress.utils.params`)."""
        return count_parameters(self)

    def executed_weight_bits(self, plan: ExecutionPlan) -> int:
        """Weight bits the blocks execute under ``plan`` (every step counts, FFNs at their active
        width, full precision = 32 bits): a cost that orders systems (which one is the smallest)
        independent of wall-clock noise."""
        total = 0
        blocks = list(self.blocks.physical_blocks())
        for step, b in enumerate(plan.blocks):
            units = plan.units_at(step, self.linear_units)
            narrowed = {id(layer) for f in blocks[b].children() if isinstance(f, ElasticFFN)
                        for layer in (f.first, f.second)}
            for name, module in blocks[b].named_modules():
                if not isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                    continue
                numel = module.weight.numel()
                if id(module) in narrowed:
                    numel = numel * units // self.linear_units
                total += numel * (plan.bits_for(f"{self.block_name(b)}.{name}") or 32)
        return total
