"""Modules that execute an :class:`~espnet_compress.core.plan.ExecutionPlan`.

They are *subclasses* of ESPnet's own modules, converted in place (``__class__`` swap, like
``torch.ao``'s module swapping keeps parameters): parameter names, parameter objects and therefore
checkpoints stay exactly those of ESPnet, so a stock ESPnet checkpoint loads unchanged and an elastic
model with the full plan is the stock model, step for step.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from espnet.nets.pytorch_backend.transformer.positionwise_feed_forward import (
    PositionwiseFeedForward,
)
from espnet.nets.pytorch_backend.transformer.repeat import MultiSequential

from espnet_compress.core.plan import ExecutionPlan
from espnet_compress.core.sharing import SharedComputation, precision_signature


def sliced_weight(module: torch.nn.Module, rows: Optional[int] = None, cols: Optional[int] = None) -> torch.Tensor:
    """The weight a narrowed layer computes with: the active slice, quantized *as a slice*.

    Quantizing the slice (not slicing a quantized full tensor) gives a narrow system its own scale,
    exactly what the same system stores when it is exported on its own, so a nested system decodes
    the same inside the supernet and as a standalone packed model.
    """
    w = module.weight
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is None and hasattr(module, "effective_weight"):  # frozen inference layers
        w = module.effective_weight()
    if rows is not None:
        w = w[:rows]
    if cols is not None:
        w = w[:, :cols]
    return quantizer(w) if quantizer is not None else w


class ElasticFeedForward(PositionwiseFeedForward):
    """ESPnet's position-wise FFN whose hidden width can be cut to a prefix of its units.

    Keeping the *first* ``active_units`` hidden units (rows of ``w_1``, columns of ``w_2``) makes
    every narrower FFN a sub-network of every wider one, which is what weight-masking supernets and
    width search need; the output bias is kept whole because it lives in model space.
    """

    active_units: Optional[int] = None

    @classmethod
    def convert(cls, module: PositionwiseFeedForward) -> "ElasticFeedForward":
        """Turn a stock FFN into an elastic one in place (parameters untouched)."""
        if type(module) is not PositionwiseFeedForward and not isinstance(module, cls):
            raise TypeError(f"cannot make {type(module).__name__} elastic; only PositionwiseFeedForward")
        module.__class__ = cls
        module.active_units = None
        return module

    @property
    def full_units(self) -> int:
        return self.w_1.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active_units
        if k is None or k == self.full_units:
            return self.w_2(self.dropout(self.activation(self.w_1(x))))
        w1 = sliced_weight(self.w_1, rows=k)
        b1 = None if self.w_1.bias is None else self.w_1.bias[:k]
        w2 = sliced_weight(self.w_2, cols=k)
        h = self.dropout(self.activation(torch.nn.functional.linear(x, w1, b1)))
        return torch.nn.functional.linear(h, w2, self.w_2.bias)


class _PlannedStep:
    """One logical step: set the block's FFN width for this step, then run the physical block
    (or take its output from the step's shared computation when another system already ran the
    same block, at the same width and precision, on the same input)."""

    __slots__ = ("index", "block", "units", "memo")

    def __init__(self, index: int, block: torch.nn.Module, units: Optional[int],
                 memo: Optional[SharedComputation]) -> None:
        self.index, self.block, self.units, self.memo = index, block, units, memo

    def __call__(self, *args: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if self.memo is None:
            return self._run(*args)
        full = getattr(self.block.feed_forward, "full_units", None)
        units = None if self.units == full else self.units
        key = ("block", self.index, units, precision_signature(self.block))
        return self.memo(key, self._run, *args)

    def _run(self, *args: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        for ffn in (self.block.feed_forward, getattr(self.block, "feed_forward_macaron", None)):
            if isinstance(ffn, ElasticFeedForward):
                ffn.active_units = self.units
        return self.block(*args)


class ElasticBlockStack(MultiSequential):
    """ESPnet's block container, iterated in the order of the active execution plan.

    ESPnet's encoders run ``for i, layer in enumerate(self.encoders)``; making *iteration* follow
    the plan lets the stock forward (embedding, intermediate CTC, conditioning, final norm) run
    unchanged while blocks are skipped, repeated or narrowed. Registration (``_modules``) is untouched,
    so ``state_dict`` names stay ``encoders.<i>.*`` and each physical block is stored once however
    often a plan uses it. Layer drop, which the stock Conformer forward never applies, is applied
    here per logical step in training.
    """

    plan: ExecutionPlan
    #: set while a multi-system step shares computation between its systems (see ``sharing``)
    memo: Optional[SharedComputation] = None

    @classmethod
    def convert(cls, stack: MultiSequential, plan: ExecutionPlan) -> "ElasticBlockStack":
        stack.__class__ = cls
        stack.plan = plan
        stack.memo = None
        return stack

    def physical_blocks(self) -> Iterator[torch.nn.Module]:
        """The physical blocks in storage order, independent of the plan."""
        return iter(self._modules.values())

    def __iter__(self) -> Iterator[_PlannedStep]:  # type: ignore[override]
        blocks = list(self._modules.values())
        drop = self.layer_drop_rate if self.training else 0.0
        for step, idx in enumerate(self.plan.blocks):
            if drop > 0.0 and float(torch.rand(())) < drop:
                continue
            units = None if self.plan.ffn_units is None else self.plan.ffn_units[step]
            yield _PlannedStep(idx, blocks[idx], units, self.memo)
