"""Modules that execute an :class:`~espnet_compress.core.plan.ExecutionPlan`.

They are *subclasses* of the host library's own modules (ESPnet's Conformer pieces, torchaudio's
wav2vec2/HuBERT pieces), converted in place (``__class__`` swap, like ``torch.ao``'s module
swapping keeps parameters): parameter names, parameter objects and therefore checkpoints stay
exactly those of the host, so a stock checkpoint loads unchanged and an elastic model with the
full plan is the stock model, step for step.

Two things are elastic, whatever the architecture:

* the **FFN hidden width** (:class:`ElasticFFN`): a prefix of the hidden units;
* the **block order** (:class:`PlannedBlocks`): the container of blocks iterates in the order of
  the plan, so skipping, repeating and reordering blocks need no change to the host's forward.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from espnet.nets.pytorch_backend.transformer.positionwise_feed_forward import (
    PositionwiseFeedForward,
)
from espnet.nets.pytorch_backend.transformer.repeat import MultiSequential
from torchaudio.models.wav2vec2.components import FeedForward as TorchaudioFeedForward

from espnet_compress.core.norm_stats import BatchMoments, SystemBatchNorm, norms_in, slot_name
from espnet_compress.core.plan import ExecutionPlan
from espnet_compress.core.sharing import SharedComputation, precision_signature
from espnet_compress.env import refuse_in_training


def sliced_weight(module: torch.nn.Module, rows: Optional[int] = None, cols: Optional[int] = None) -> torch.Tensor:
    """The weight a narrowed layer computes with.

    In training (a weight quantizer attached) the active slice is quantized *as a slice*: a narrow
    system gets its own scale, exactly what the same system stores when it is exported on its own.
    A frozen inference layer (loaded from a packed file) already holds the codes its system
    computes with, so its weight is only sliced, never re-quantized; its kernel-specific form
    (int8/int4 packing) has no ``weight`` attribute, only ``effective_weight``.

    A quantizer marked ``whole_tensor`` (bit planes) quantizes the whole weight and the slice reads
    its codes, so every width of the layer shares one set of codes (what one packed file stores).
    """
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is not None and quantizer.whole_tensor:
        w, quantizer = quantizer(module.weight), None
    elif quantizer is None and hasattr(module, "effective_weight"):
        w = module.effective_weight()
    else:
        w = module.weight
    if rows is not None:
        w = w[:rows]
    if cols is not None:
        w = w[:, :cols]
    return quantizer(w) if quantizer is not None else w


class ElasticFFN:
    """Mixin: a two-layer FFN whose hidden width can be cut to a prefix of its units.

    Keeping the *first* ``active_units`` hidden units (rows of the first layer, columns of the
    second) makes every narrower FFN a sub-network of every wider one, which is what
    weight-masking supernets rely on; the output bias is kept whole because it
    lives in model space. Subclasses name their two layers (``IN``/``OUT``) and say what runs
    between them (``hidden``); the host class this converts is ``HOST``.
    """

    IN: str
    OUT: str
    HOST: type
    active_units: Optional[int] = None

    @classmethod
    def convert(cls, module: torch.nn.Module) -> "ElasticFFN":
        """Turn a stock FFN into an elastic one in place (parameters untouched)."""
        if type(module) is not cls.HOST and not isinstance(module, cls):
            raise TypeError(f"cannot make {type(module).__name__} elastic as {cls.__name__}; "
                            f"only {cls.HOST.__name__}")
        module.__class__ = cls
        module.active_units = None
        return module

    @property
    def first(self) -> torch.nn.Linear:
        return getattr(self, self.IN)

    @property
    def second(self) -> torch.nn.Linear:
        return getattr(self, self.OUT)

    @property
    def full_units(self) -> int:
        return self.first.out_features

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Activation (and dropout) between the two layers."""
        raise NotImplementedError

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """What follows the second layer (identity unless the host adds dropout there)."""
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active_units
        if k is None or k == self.full_units:
            return self.output(self.second(self.hidden(self.first(x))))
        first, second = self.first, self.second
        bias = None if first.bias is None else first.bias[:k]
        h = self.hidden(torch.nn.functional.linear(x, sliced_weight(first, rows=k), bias))
        return self.output(torch.nn.functional.linear(h, sliced_weight(second, cols=k), second.bias))


class ElasticFeedForward(ElasticFFN, PositionwiseFeedForward):
    """ESPnet's position-wise FFN (``w_1`` -> activation -> dropout -> ``w_2``), elastic."""

    IN, OUT, HOST = "w_1", "w_2", PositionwiseFeedForward

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.activation(h))


class ElasticTorchaudioFeedForward(ElasticFFN, TorchaudioFeedForward):
    """torchaudio's wav2vec2/HuBERT FFN (``intermediate_dense`` -> GELU -> dropout ->
    ``output_dense`` -> dropout), elastic."""

    IN, OUT, HOST = "intermediate_dense", "output_dense", TorchaudioFeedForward

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.intermediate_dropout(torch.nn.functional.gelu(h))

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return self.output_dropout(y)


class _PlannedStep:
    """One logical step: set the block's FFN widths and norm-statistics slot for this step, then
    run the physical block (or take its output from the step's shared computation when another
    system already ran the same block, at the same width and precision, on the same input; the
    batch moments of its norms are then replayed into this system's slots)."""

    __slots__ = ("index", "block", "units", "memo", "norms", "slot")

    def __init__(self, index: int, block: torch.nn.Module, units: Optional[int],
                 memo: Optional[SharedComputation], norms: List[SystemBatchNorm], slot: Optional[str]) -> None:
        self.index, self.block, self.units, self.memo, self.norms, self.slot = index, block, units, memo, norms, slot

    def _ffns(self) -> Iterator[ElasticFFN]:
        return (m for m in self.block.children() if isinstance(m, ElasticFFN))

    def __call__(self, *args: Any) -> Any:
        norms = self.norms
        for norm in norms:
            norm.slot = self.slot
        if self.memo is None:
            return self._run(*args)
        full = next((f.full_units for f in self._ffns()), None)
        units = None if self.units == full else self.units
        key = ("block", self.index, units, precision_signature(self.block))
        output, moments = self.memo(key, self._run_recorded, norms, *args)
        for m in moments:
            m.apply()
        return output

    def _run(self, *args: Any) -> Any:
        for ffn in self._ffns():
            ffn.active_units = self.units
        return self.block(*args)

    def _run_recorded(self, norms: List[SystemBatchNorm], *args: Any) -> Tuple[Any, List[BatchMoments]]:
        moments: List[BatchMoments] = []
        for norm in norms:
            norm.recorder = moments
        try:
            return self._run(*args), moments
        finally:
            for norm in norms:
                norm.recorder = None


class PlannedBlocks:
    """Mixin for a host's block container: iterated in the order of the active execution plan.

    Hosts run ``for layer in self.encoders`` (ESPnet) or ``for layer in self.layers``
    (torchaudio); making *iteration* follow the plan lets the host's forward run unchanged while
    blocks are skipped, repeated or narrowed. Registration (``_modules``) is untouched, so
    ``state_dict`` names stay ``<container>.<i>.*`` and each physical block is stored once however
    often a plan uses it. Layer drop, where the host applies it, is applied here, per logical step
    in training. Each step also selects the norm-statistics slot of (plan, use of the block)
    (:mod:`~espnet_compress.core.norm_stats`).
    """

    plan: ExecutionPlan
    #: set while a multi-system step shares computation between its systems (see ``sharing``)
    memo: Optional[SharedComputation] = None
    layer_drop_rate: float = 0.0
    #: plan that owns the norms' own buffers (its first use of each block)
    stats_owner: Optional[str] = None
    #: plans that have statistics slots of their own, by name
    stats_plans: Dict[str, ExecutionPlan] = {}
    #: a decode-only environment variable chose the plan or system (training refuses it)
    decode_env: bool = False
    #: the norms of each physical block (per-system statistics)
    block_norms: List[List[SystemBatchNorm]]

    @classmethod
    def convert(cls, container: torch.nn.Module, plan: ExecutionPlan, layer_drop_rate: float = 0.0):
        container.__class__ = cls
        container.plan = plan
        container.memo = None
        container.layer_drop_rate = layer_drop_rate
        container.stats_owner, container.stats_plans = None, {}
        container.decode_env = False
        # looked up once: every step selects their statistics slot
        container.block_norms = [norms_in(block) for block in container.physical_blocks()]
        return container

    def physical_blocks(self) -> Iterator[torch.nn.Module]:
        """The physical blocks in storage order, independent of the plan."""
        return iter(self._modules.values())

    def track_norm_stats(self, plans: Dict[str, ExecutionPlan], owner: str) -> None:
        """Give every (plan, use of a block) its own norm statistics; ``owner``'s first use of each
        block keeps the norms' own buffers. Slots no plan needs any more are dropped."""
        for index, norms in enumerate(self.block_norms):
            names = [slot_name(name, use) for name, plan in plans.items()
                     for use in range(plan.blocks.count(index)) if (name, use) != (owner, 0)]
            for norm in norms:
                norm.set_slots(names)
        self.stats_owner, self.stats_plans = owner, dict(plans)

    def stats_slot(self, plan: ExecutionPlan, index: int, use: int) -> Optional[str]:
        """The slot a plan's ``use``-th run of block ``index`` normalises with (``None``: own
        buffers). A plan without statistics of its own (an ad-hoc decode plan, or another plan
        under a registered name) uses the owner's, for a use the owner never makes its last one."""
        name = plan.name
        if not self.has_own_stats(plan):
            if self.stats_owner is None:
                return None
            name = self.stats_owner
            use = max(0, min(use, self.stats_plans[name].blocks.count(index) - 1))
        return None if (name, use) == (self.stats_owner, 0) else slot_name(name, use)

    def has_own_stats(self, plan: ExecutionPlan) -> bool:
        """Whether ``plan`` was given statistics of its own (see :meth:`track_norm_stats`)."""
        return self.stats_plans.get(plan.name) == plan

    def __iter__(self) -> Iterator[_PlannedStep]:
        if self.training and self.decode_env:
            refuse_in_training("encoder")
        blocks = list(self._modules.values())
        drop = self.layer_drop_rate if self.training else 0.0
        for step, (idx, use) in enumerate(zip(self.plan.blocks, self.plan.uses())):
            if drop > 0.0 and float(torch.rand(())) <= drop:
                continue
            units = None if self.plan.ffn_units is None else self.plan.ffn_units[step]
            norms = self.block_norms[idx]
            slot = self.stats_slot(self.plan, idx, use) if norms else None
            yield _PlannedStep(idx, blocks[idx], units, self.memo, norms, slot)


class ElasticBlockStack(PlannedBlocks, MultiSequential):
    """ESPnet's block container (``MultiSequential``), iterated in plan order. ESPnet's Conformer
    forward iterates its blocks itself and never applies ``MultiSequential``'s layer drop, so
    neither does this (the encoder refuses ``layer_drop_rate`` rather than silently ignore it)."""


class ElasticLayerList(PlannedBlocks, torch.nn.ModuleList):
    """A ``ModuleList`` of blocks (torchaudio's wav2vec2/HuBERT transformer layers), iterated in plan
    order; the encoder that owns it moves the host's layer drop here (``layer_drop_rate``)."""
