"""Batch-norm statistics per system and per use of a block (switchable norm statistics).

Every system of a supernet runs the *same* ``BatchNorm`` modules (ESPnet's Conformer convolution
module has one per block), but not on the same activations: a shallow, narrow or 4-bit system, a
seed run at another depth, and the second use of a repeated (folded) block each see their own
distribution. A single pair of running buffers would average them all, so at decode time every
system would normalise with statistics that belong to none of them, and an exported system would
carry that mixture. Slimmable and once-for-all networks solve it with private statistics per
configuration; we do the same, with one *slot* per (system, use of the block):

* the largest system's first use of each block keeps the module's own ``running_mean`` /
  ``running_var`` (stock names, so stock checkpoints load and an exported largest system is stock);
* every other (system, use) gets ``<norm>.system_stats.<slot>.running_*`` buffers, updated only
  when that system runs that use of the block; weights and biases stay shared (they are trained
  by every system, as in the papers).

Private statistics are chosen over a post-training recalibration pass because they need no extra
data pass or program: ESPnet's validation, checkpoint averaging and ``asr_inference`` see the right
statistics for every system as they are, and a system that shares a computed prefix with another
(:mod:`~espnet_compress.core.sharing`) gets the same batch moments replayed into its own slot, so
sharing stays exact for the statistics too.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Set

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SLOT_CONTAINER = "system_stats"


def slot_name(plan: str, use: int) -> str:
    """Name of the statistics slot of ``plan``'s ``use``-th run of a block (0 = first)."""
    return plan if use == 0 else f"{plan}__use{use}"


class _RunningStats(torch.nn.Module):
    """One slot: the three buffers a ``BatchNorm`` keeps, under the same names."""

    def __init__(self, like: torch.nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.register_buffer("running_mean", like.running_mean.detach().clone())
        self.register_buffer("running_var", like.running_var.detach().clone())
        self.register_buffer("num_batches_tracked", like.num_batches_tracked.detach().clone())


class BatchMoments:
    """Batch mean/variance one normalisation computed, to be written into each slot that uses it
    (once per slot: a shared computation is replayed for every system that reuses it)."""

    __slots__ = ("norm", "mean", "var", "applied")

    def __init__(self, norm: "SystemBatchNorm", mean: torch.Tensor, var: torch.Tensor) -> None:
        self.norm, self.mean, self.var = norm, mean, var
        self.applied: Set[Optional[str]] = set()

    def apply(self) -> None:
        """Update the norm's currently selected slot with these moments (idempotent per slot)."""
        slot = self.norm.slot
        if slot in self.applied:
            return
        self.applied.add(slot)
        self.norm.update_slot(slot, self.mean, self.var)


class SystemBatchNorm:
    """Mixin for a host ``BatchNorm``: running statistics per slot, chosen by ``slot``.

    ``slot is None`` is the module's own buffers: with no slots registered the module *is* the
    stock one, step for step. ``recorder`` (a list) switches training forwards to "normalise with
    the batch moments and hand them to the caller" instead of updating a slot directly.
    """

    slot: Optional[str] = None
    recorder: Optional[List[BatchMoments]] = None

    @classmethod
    def convert(cls, module: torch.nn.modules.batchnorm._BatchNorm) -> "SystemBatchNorm":
        target = _CONVERTED.get(type(module))
        if target is None:
            if isinstance(module, SystemBatchNorm):
                return module
            raise TypeError(f"cannot give {type(module).__name__} per-system statistics; "
                            f"supported: {[c.__name__ for c in _CONVERTED]}")
        module.__class__ = target
        module.slot, module.recorder = None, None
        setattr(module, SLOT_CONTAINER, torch.nn.ModuleDict())
        return module

    # ------------------------------------------------------------------ slots
    @property
    def slots(self) -> torch.nn.ModuleDict:
        return getattr(self, SLOT_CONTAINER)

    def set_slots(self, names: List[str]) -> None:
        """Keep exactly these extra slots; new ones start from the own buffers' current values
        (the best estimate there is before the system has run)."""
        slots = self.slots
        for name in [n for n in slots if n not in names]:
            del slots[name]
        for name in names:
            if name not in slots:
                if "." in name or not name:
                    raise ValueError(f"invalid statistics slot name {name!r}")
                slots[name] = _RunningStats(self)

    def _buffers_of(self, slot: Optional[str]):
        if slot is None:
            return self.running_mean, self.running_var, self.num_batches_tracked
        stats = self.slots[slot]
        return stats.running_mean, stats.running_var, stats.num_batches_tracked

    def _factor(self, count: torch.Tensor) -> float:
        return 1.0 / float(count) if self.momentum is None else self.momentum

    def update_slot(self, slot: Optional[str], mean: torch.Tensor, var: torch.Tensor) -> None:
        """``running = (1 - m) running + m batch`` for one slot, as ``BatchNorm`` does itself."""
        rmean, rvar, count = self._buffers_of(slot)
        with torch.no_grad():
            count.add_(1)
            f = self._factor(count)
            rmean.mul_(1 - f).add_(mean, alpha=f)
            rvar.mul_(1 - f).add_(var, alpha=f)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.track_running_stats:
            return super().forward(x)
        rmean, rvar, count = self._buffers_of(self.slot)
        if not self.training:
            return F.batch_norm(x, rmean, rvar, self.weight, self.bias, False, 0.0, self.eps)
        if self.recorder is None:
            count.add_(1)
            return F.batch_norm(x, rmean, rvar, self.weight, self.bias, True, self._factor(count), self.eps)
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():
            moments = BatchMoments(self, x.mean(dims), x.var(dims, unbiased=True))
        self.recorder.append(moments)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        """A checkpoint without a slot's buffers (written before per-system statistics, a stock
        or single-system checkpoint given to ``--init_param``) starts that slot from the own
        statistics instead of failing a strict load."""
        filled = []
        for name in self.slots:
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                key, own = f"{prefix}{SLOT_CONTAINER}.{name}.{buf}", f"{prefix}{buf}"
                if key not in state_dict and own in state_dict:
                    state_dict[key] = state_dict[own]
                    filled.append(name)
        if filled:
            log.warning("%s: checkpoint has no statistics of its own for %s; starting them from the shared "
                        "statistics", prefix.rstrip("."), sorted(set(filled)))
        super()._load_from_state_dict(state_dict, prefix, *args)


class SystemBatchNorm1d(SystemBatchNorm, torch.nn.BatchNorm1d):
    """``BatchNorm1d`` (ESPnet's Conformer convolution module) with per-slot statistics."""


class SystemBatchNorm2d(SystemBatchNorm, torch.nn.BatchNorm2d):
    """``BatchNorm2d`` with per-slot statistics."""


_CONVERTED = {torch.nn.BatchNorm1d: SystemBatchNorm1d, torch.nn.BatchNorm2d: SystemBatchNorm2d}


def is_batch_norm(module: torch.nn.Module) -> bool:
    """A norm whose statistics can be kept per slot (the host's, or already converted)."""
    return type(module) in _CONVERTED or isinstance(module, SystemBatchNorm)


def norms_in(module: torch.nn.Module) -> List[SystemBatchNorm]:
    """The converted norms under ``module``, in registration order."""
    return [m for m in module.modules() if isinstance(m, SystemBatchNorm)]
