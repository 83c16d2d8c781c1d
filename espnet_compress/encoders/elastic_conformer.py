"""``elastic_conformer``: ESPnet's Conformer whose forward follows an explicit execution plan.

This is the one encoder every compression method in the toolkit configures. Constructed with the
same options as ESPnet's ``conformer`` and the default plan it *is* that encoder: same parameter
names, same numbers, so existing ESPnet Conformer checkpoints load unchanged and can be compressed.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from typing import Any, Dict, Iterator, Mapping, Union

import torch

from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_compress.core.elastic import ElasticBlockStack, ElasticFeedForward
from espnet_compress.core.plan import ExecutionPlan, PlanError
from espnet_compress.core.sharing import SharedComputation, precision_signature
from espnet_compress.quant.api import quantized_modules
from espnet_compress.quant.quantizers import UnsupportedBitWidth, check_bits
from espnet_compress.utils.signature import merge_signature, reject_unknown_options

PlanLike = Union[None, Mapping[str, Any], ExecutionPlan]
ENV_PLAN = "ESPNET_COMPRESS_PLAN"


@merge_signature(ConformerEncoder.__init__, skip=("self", "input_size"))
class ElasticConformerEncoder(ConformerEncoder):
    """Conformer encoder executing an :class:`ExecutionPlan` (block order, FFN widths, bit widths).

    Args:
        input_size: input feature dimension (given by ESPnet).
        plan: the default plan, as a mapping (``blocks``, ``ffn_units``, ``bits``) or a plan object;
            ``None`` runs every block once at full width, i.e. the stock Conformer.
        **conformer_kwargs: every option of ESPnet's ``ConformerEncoder`` (same names, same
            defaults; ``--print_config`` lists them).
    """

    def __init__(self, input_size: int, plan: PlanLike = None, **conformer_kwargs: Any) -> None:
        reject_unknown_options(type(self), conformer_kwargs, "encoder_conf")
        super().__init__(input_size, **conformer_kwargs)
        opts = _conformer_defaults() | conformer_kwargs
        self.num_physical_blocks: int = opts["num_blocks"]
        self.linear_units: int = opts["linear_units"]
        self._elastic_ffn = opts["positionwise_layer_type"] == "linear"
        if self._elastic_ffn:
            for block in self.encoders:
                ElasticFeedForward.convert(block.feed_forward)
                if block.feed_forward_macaron is not None:
                    ElasticFeedForward.convert(block.feed_forward_macaron)
        ElasticBlockStack.convert(self.encoders, ExecutionPlan.full(self.num_physical_blocks))
        self._prepare()
        self.default_plan = self.set_plan(self._default_plan(plan))
        self.apply_env_plan()

    # Hooks for configurations of the core (quantized, foldable, ...): they run inside __init__,
    # after ESPnet built the blocks and before the default plan is validated and installed.
    def _prepare(self) -> None:
        """Attach whatever the configuration adds to the modules (e.g. weight quantizers)."""

    def _default_plan(self, plan: PlanLike) -> PlanLike:
        """The default plan given the user's ``plan`` option (e.g. add default bit widths)."""
        return plan

    def apply_env_plan(self) -> None:
        """Switch to the plan in ``ESPNET_COMPRESS_PLAN`` if it is set (validated like any plan).

        The environment variable (JSON, e.g. ``'{"blocks": [0, 1, 2]}'`` or, for foldable encoders,
        ``'{"depth": 6}'``) lets stock programs such as ``asr_inference`` choose the plan at decode
        time without editing the config.
        """
        text = os.environ.get(ENV_PLAN)
        if not text:
            return
        try:
            conf = json.loads(text)
        except ValueError as err:
            raise PlanError(f"{ENV_PLAN}: not valid JSON ({err}): {text!r}") from None
        self.set_plan(conf if "name" in conf else dict(conf, name=ENV_PLAN))

    # ------------------------------------------------------------------ plans
    def check_plan(self, plan: PlanLike, name: str = "plan") -> ExecutionPlan:
        """Validate a plan against this encoder's physical shape (raises :class:`PlanError`)."""
        if isinstance(plan, Mapping) and ("depth" in plan or "path_index" in plan):
            raise PlanError(f"plan '{plan.get('name', name)}': 'depth'/'path_index' (unfolding) need the "
                            f"foldable_conformer encoder; use 'blocks' to skip or repeat blocks here")
        plan = ExecutionPlan.from_config(plan, self.num_physical_blocks, name=name)
        plan.validate(self.num_physical_blocks, self.linear_units)
        if plan.ffn_units is not None and not self._elastic_ffn and any(
            u != self.linear_units for u in plan.ffn_units
        ):
            raise PlanError(
                f"plan '{plan.name}': ffn_units needs positionwise_layer_type 'linear' "
                f"(conv1d FFNs cannot be narrowed)"
            )
        for pattern, nbits in plan.bits:
            try:
                check_bits(nbits, f"plan '{plan.name}' bits['{pattern}']")
            except UnsupportedBitWidth as err:
                raise PlanError(str(err)) from None
        quantized = self.quantizable_modules()
        if any(b != 0 for _, b in plan.bits) and not quantized:
            raise PlanError(
                f"plan '{plan.name}': bits are set but this encoder has no quantized weights; "
                f"use a quantized encoder (e.g. quantized_conformer) or attach quantizers first"
            )
        for module_name, module in quantized.items():
            nbits = plan.bits_for(module_name)
            if nbits and nbits not in module.weight_quantizer.bit_choices:
                raise PlanError(
                    f"plan '{plan.name}': bits {nbits} for '{module_name}' is not among the widths its "
                    f"quantizer was built for {list(module.weight_quantizer.bit_choices)}; add it to "
                    f"quant_conf.bit_choices"
                )
        return plan

    @property
    def plan(self) -> ExecutionPlan:
        """The plan the next forward will run."""
        return self.encoders.plan

    def set_plan(self, plan: PlanLike) -> ExecutionPlan:
        """Make ``plan`` the active plan (validated) and set each quantized module's bit width."""
        plan = self.check_plan(plan)
        self.encoders.plan = plan
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

    @contextlib.contextmanager
    def sharing(self, memo: SharedComputation) -> Iterator[SharedComputation]:
        """Within the body, forwards under different plans share identical sub-computations.

        The input layer and every planned step consult ``memo``: a system whose plan starts like
        another's (same blocks, widths and precisions) reuses that prefix instead of recomputing
        it. The stock ``ConformerEncoder.forward`` calls ``self.embed(...)`` directly, so the
        embedding is routed through the memo by an instance-level ``forward`` that exists only
        inside this context.
        """
        embed = self.embed
        original = embed.forward
        embed.forward = lambda *args: memo(("embed", precision_signature(embed)), original, *args)
        self.encoders.memo = memo
        try:
            yield memo
        finally:
            del embed.forward
            self.encoders.memo = None

    def quantizable_modules(self) -> Dict[str, torch.nn.Module]:
        """Modules whose weight precision a plan can set (they carry a quantizer), by name."""
        return quantized_modules(self)

    def physical_parameters(self) -> int:
        """Parameters stored for this encoder, independent of the plan (shared blocks count once)."""
        return sum(p.numel() for p in self.parameters())


def _conformer_defaults() -> dict:
    return {
        k: p.default
        for k, p in inspect.signature(ConformerEncoder.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
