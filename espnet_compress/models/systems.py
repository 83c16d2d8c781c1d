"""Systems: the named sub-models that one set of weights holds.

A *system* is an encoder execution plan (which blocks run, FFN width per step, weight bits per
module) plus the decoder's weight bits. The all-in-one supernet trains several at once, the
foldable model trains a deep unfolding and its seed, and each can be decoded or exported on its
own. Systems are declared in ``model_conf.systems`` (YAML mapping, name -> spec) and validated
against the built encoder/decoder when the model is built, so an impossible system fails before
any training starts, with the system and the field named.
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from espnet_compress.core.plan import ExecutionPlan, PlanError
from espnet_compress.encoders.elastic import PLAN_FIELDS, ElasticEncoder
from espnet_compress.quant.api import quantized_modules
from espnet_compress.quant.quantizers import UnsupportedBitWidth, check_bits

#: a system spec: any plan field (and the keys the encoder's features resolve), plus the model's own
SYSTEM_MODEL_FIELDS = ("decoder_bits", "weight")
SYSTEM_FIELDS = tuple(f for f in PLAN_FIELDS if f != "name") + SYSTEM_MODEL_FIELDS
#: system names become parts of state-dict keys (per-system norm statistics) and of file names
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class SystemSpecError(ValueError):
    """An impossible system spec; the message names the system and the field."""


@dataclasses.dataclass(frozen=True)
class SystemSpec:
    """One nested/folded system: encoder plan, decoder precision and its loss weight (lambda_i)."""

    name: str
    plan: ExecutionPlan
    decoder_bits: int = 0
    weight: float = 1.0

    def to_config(self) -> Dict[str, Any]:
        conf = self.plan.to_config()
        conf.pop("name", None)
        if self.decoder_bits:
            conf["decoder_bits"] = self.decoder_bits
        if self.weight != 1.0:
            conf["weight"] = self.weight
        return conf


def parse_systems(conf: Mapping[str, Any], encoder: torch.nn.Module,
                  decoder: Optional[torch.nn.Module]) -> Dict[str, SystemSpec]:
    """Validate ``model_conf.systems`` against the built encoder and decoder."""
    if not isinstance(conf, Mapping) or not conf:
        raise SystemSpecError("model_conf.systems must be a non-empty mapping {name: spec}")
    if not isinstance(encoder, ElasticEncoder):
        raise SystemSpecError(
            f"model_conf.systems needs an elastic encoder (elastic_conformer, quantized_conformer, "
            f"foldable_conformer, elastic_wav2vec2, ...), got {type(encoder).__name__}"
        )
    decoder_q = quantized_modules(decoder) if decoder is not None else {}
    systems: Dict[str, SystemSpec] = {}
    for name, spec in conf.items():
        spec = {} if spec is None else spec
        where = f"model_conf.systems.{name}"
        if not _NAME.match(str(name)) or "__use" in str(name):
            raise SystemSpecError(f"model_conf.systems.{name}: a system name may contain only letters, digits, "
                                  f"'_' and '-' (and not '__use'); it names state-dict entries and files")
        if not isinstance(spec, Mapping):
            raise SystemSpecError(f"{where}: expected a mapping of {list(SYSTEM_FIELDS)}, got {spec!r}")
        unknown = sorted(set(spec) - set(SYSTEM_FIELDS))
        if unknown:
            raise SystemSpecError(f"{where}: unknown field(s) {unknown}; allowed: {list(SYSTEM_FIELDS)}")
        plan_conf = {k: v for k, v in spec.items() if k not in SYSTEM_MODEL_FIELDS}
        try:
            plan = encoder.check_plan(plan_conf, name=str(name))
        except (PlanError, UnsupportedBitWidth) as err:
            raise SystemSpecError(f"{where}: {err}") from None
        dbits = spec.get("decoder_bits", 0)
        try:
            check_bits(dbits, f"{where} decoder_bits")
        except UnsupportedBitWidth as err:
            raise SystemSpecError(str(err)) from None
        if dbits:
            if not decoder_q:
                raise SystemSpecError(f"{where}: decoder_bits {dbits} needs model_conf.decoder_quant (decoder is fp)")
            bad = [n for n, m in decoder_q.items() if dbits not in m.weight_quantizer.bit_choices]
            if bad:
                raise SystemSpecError(
                    f"{where}: decoder_bits {dbits} is not among decoder_quant's widths "
                    f"{list(decoder_q[bad[0]].weight_quantizer.bit_choices)}; add it to decoder_quant.bit_choices"
                )
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise SystemSpecError(f"{where}: weight must be a number >= 0, got {weight!r}")
        systems[str(name)] = SystemSpec(str(name), plan, dbits, float(weight))
    return systems


class SystemSampler:
    """Which systems run in a training step.

    ``all``: every system. ``sandwich``: the largest, the smallest and ``num_random`` others drawn
    uniformly (the slimmable-network sandwich rule). ``random``: the largest and ``num_random``
    others. The draw depends only on ``(seed, step)``, so every DDP rank, which sees the same
    number of steps, draws the same systems and the ranks' gradients stay aligned.
    """

    MODES = ("all", "sandwich", "random")

    def __init__(self, names: Sequence[str], largest: str, smallest: str, mode: str = "all",
                 num_random: int = 1, seed: int = 0) -> None:
        if mode not in self.MODES:
            raise SystemSpecError(f"model_conf.sampling: unknown mode '{mode}'; allowed: {list(self.MODES)}")
        if isinstance(num_random, bool) or not isinstance(num_random, int) or num_random < 0:
            raise SystemSpecError(f"model_conf.num_random_systems must be an integer >= 0, got {num_random!r}")
        self.names = list(names)
        self.largest, self.smallest = largest, smallest
        self.mode, self.num_random, self.seed = mode, num_random, seed

    def draw(self, step: int) -> List[str]:
        """Systems for ``step``, the largest first (it is the distillation teacher)."""
        if self.mode == "all":
            return [self.largest] + [n for n in self.names if n != self.largest]
        chosen = [self.largest]
        if self.mode == "sandwich" and self.smallest != self.largest:
            chosen.append(self.smallest)
        others = [n for n in self.names if n not in chosen]
        rng = random.Random(self.seed * 1_000_003 + step)
        chosen += rng.sample(others, min(self.num_random, len(others)))
        return chosen
