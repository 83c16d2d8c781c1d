"""Computation shared by the systems of one multi-system training step.

Systems of one supernet often run the *same* sub-computation on the same input: every system that
keeps the front end's precision runs the identical Conv2d subsampling, a depth-3 system skipping
only the last block repeats the largest system's first three blocks, a foldable seed run in
``cycle`` order is a prefix of its unfolded path. Recomputing them once per system is pure waste
(the paper's one forward per system), so a step evaluates each distinct (module, configuration,
input) once and hands the same output, graph and all, to every system that asks. The gradient is
exactly what separate recomputation gives: autograd sums every consumer's contribution into the
shared node. The one visible difference is that dropout inside a shared prefix draws one mask for
all the systems that share it.

Matching is deliberately strict. A floating-point input matches only the very same tensor, or
the same view of the same base tensor (ESPnet re-slices its batch on every call), and only while
no in-place operation has changed it since (its version counter is checked): anything else may
carry a different autograd graph or different values. Integer and boolean tensors (padding
masks, lengths, rebuilt by ESPnet on every call) match by value.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Tuple

import torch


def _flatten(obj: Any) -> List[Any]:
    if isinstance(obj, (tuple, list)):
        return [leaf for item in obj for leaf in _flatten(item)]
    return [obj]


def _same_input(stored: Any, version: int, given: Any) -> bool:
    if isinstance(stored, torch.Tensor) and isinstance(given, torch.Tensor):
        if stored.is_floating_point() or stored.is_complex() or stored.requires_grad or given.requires_grad:
            same_view = stored is given or (
                stored._base is not None and stored._base is given._base
                and stored.data_ptr() == given.data_ptr() and stored.stride() == given.stride()
            )
            return (same_view and stored.shape == given.shape and stored.dtype == given.dtype
                    and given._version == version)
        return (stored.shape == given.shape and stored.dtype == given.dtype and stored.device == given.device
                and torch.equal(stored, given))
    if isinstance(stored, torch.Tensor) or isinstance(given, torch.Tensor):
        return False
    return stored is given or (type(stored) is type(given) and stored == given)


class SharedComputation:
    """Memo of module calls for one training step (create one per step; it holds the outputs).

    Call ``memo(key, fn, *args)``: ``key`` names the computation and everything that configures it
    (module, FFN width, bit widths); ``fn(*args)`` runs only if no earlier call with this key had
    the same inputs. ``hits``/``misses`` count reuse (tests and logs use them).
    """

    def __init__(self) -> None:
        self._entries: Dict[Hashable, List[Tuple[List[Any], List[int], Any]]] = {}
        self.hits = 0
        self.misses = 0

    def __call__(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Any:
        leaves = _flatten(args)
        for inputs, versions, output in self._entries.get(key, ()):
            if len(inputs) == len(leaves) and all(
                _same_input(a, v, b) for a, v, b in zip(inputs, versions, leaves)
            ):
                self.hits += 1
                return output
        self.misses += 1
        versions = [leaf._version if isinstance(leaf, torch.Tensor) else 0 for leaf in leaves]
        output = fn(*args)
        # The inputs stay referenced by the entry, so no new tensor can take their identity.
        self._entries.setdefault(key, []).append((leaves, versions, output))
        return output


def precision_signature(module: torch.nn.Module) -> Tuple[int, ...]:
    """The bit width of every quantized weight under ``module``, in registration order: two calls
    of one module compute the same function exactly when these (and FFN widths) agree."""
    return tuple(m.weight_quantizer.bits for m in module.modules() if hasattr(m, "weight_quantizer"))
