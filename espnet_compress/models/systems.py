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
import math
import random
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from espnet_compress.core.plan import BitsRules, ExecutionPlan, PlanError, bits_for
from espnet_compress.encoders.elastic import PLAN_FIELDS, ElasticEncoder
from espnet_compress.quant.api import quantized_modules
from espnet_compress.quant.quantizers import UnsupportedBitWidth, check_bits

#: a system spec: any plan field (and the keys the encoder's features resolve), plus the model's own
SYSTEM_MODEL_FIELDS = ("decoder_bits", "weight", "stochastic_bits")
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
    #: stochastic precision: ``plan`` is then its most likely mix, redrawn in every training step
    stochastic: Optional["StochasticPrecision"] = None

    def to_config(self) -> Dict[str, Any]:
        conf = self.plan.to_config()
        conf.pop("name", None)
        if self.decoder_bits:
            conf["decoder_bits"] = self.decoder_bits
        if self.weight != 1.0:
            conf["weight"] = self.weight
        if self.stochastic is not None:
            conf["bits"] = {p: b for p, b in self.stochastic.base_bits}
            conf["stochastic_bits"] = self.stochastic.to_config()
        return conf

    def plan_for_step(self, encoder: ElasticEncoder, step: int, seed: int) -> ExecutionPlan:
        """The plan this system trains with at ``step``: its own, or a fresh draw if stochastic."""
        if self.stochastic is None:
            return self.plan
        return self.stochastic.plan(encoder, self.plan, self.stochastic.draw(step, seed, self.name))


# ------------------------------------------------------------------------------ stochastic precision
def authors_schedule(num_layers: int) -> Tuple[float, ...]:
    """Per-layer probability of the low precision in the one-bit ASR authors' code (QACT,
    ``mix-rate 1.8``): ``p_i = ln(a_i / 0.9)`` with ``a_i`` evenly spaced from ``e^0.2`` to ``e^0.8``,
    i.e. 0.305 ... 0.905 over their 12 layers, deeper layers more often low; here spread over
    ``num_layers`` (the same end points at any depth)."""
    if num_layers < 1:
        raise SystemSpecError("a stochastic precision schedule needs at least one layer")
    lo, hi = math.exp(0.2), math.exp(0.8)
    if num_layers == 1:
        return (math.log(lo / 0.9),)
    return tuple(math.log((lo + (hi - lo) * i / (num_layers - 1)) / 0.9) for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class StochasticPrecision:
    """``stochastic_bits`` of a system: in every training step, layer ``i`` (the ``i``-th block the
    plan runs) computes at ``low`` bits with probability ``probs[i]``, else at ``high`` bits.

    "Computes at ``low`` bits" means: every quantized module of that block that the system's
    ``bits`` rules (``base_bits``) put at ``high`` bits is switched to ``low``; modules at other
    widths (e.g. the conv module kept at 4 bits) stay. The draw depends only on (``sampling_seed``,
    training step, system name), never on torch's RNG, so every DDP rank draws the same mix and a
    resumed run continues the sequence (the model's persistent step counter).
    """

    low: int
    high: int
    probs: Tuple[float, ...]
    base_bits: BitsRules

    def to_config(self) -> Dict[str, Any]:
        return {"low": self.low, "high": self.high, "probs": list(self.probs)}

    def draw(self, step: int, seed: int, name: str) -> Tuple[bool, ...]:
        """Which layers run ``low`` at ``step`` (a function of its arguments only)."""
        rng = random.Random(f"stochastic_bits:{seed}:{step}:{name}")
        return tuple(rng.random() < p for p in self.probs)

    def most_likely(self) -> Tuple[bool, ...]:
        """The deterministic mix a declared stochastic system decodes and validates with: each
        layer at its more likely precision (low when ``p >= 0.5``)."""
        return tuple(p >= 0.5 for p in self.probs)

    def plan(self, encoder: ElasticEncoder, like: ExecutionPlan, low_layers: Sequence[bool]) -> ExecutionPlan:
        """``like`` (same blocks, widths and name) with the layers flagged in ``low_layers`` low."""
        rules = mix_rules(encoder, like.blocks, self.base_bits, low_layers, self.low, self.high)
        return dataclasses.replace(like, bits=rules)


def mix_rules(encoder: ElasticEncoder, blocks: Sequence[int], base_bits: BitsRules, low_layers: Sequence[bool],
              low: int, high: int) -> BitsRules:
    """Bits rules that put layer ``i`` (physical block ``blocks[i]``) at ``low`` where
    ``low_layers[i]``: one exact-name rule per switched module (those ``base_bits`` put at ``high``),
    ahead of ``base_bits``. Exact names because a glob cannot say "this block AND whatever the base
    rule matched"; also usable at decode time for a fixed mix ("1.5-bit": first half low)."""
    if len(low_layers) != len(blocks):
        raise PlanError(f"precision mix: {len(low_layers)} layer flags for a plan of {len(blocks)} layers")
    prefixes = [f"{encoder.block_name(b)}." for b, is_low in zip(blocks, low_layers) if is_low]
    switched = [(name, low) for name in encoder.quantizable_modules()
                if any(name.startswith(p) for p in prefixes) and bits_for(base_bits, name) == high]
    return tuple(switched) + tuple(base_bits)


def parse_stochastic(conf: Any, encoder: ElasticEncoder, base: ExecutionPlan, where: str) -> StochasticPrecision:
    """Validate ``stochastic_bits: {low, high, probs}`` (``probs`` omitted = :func:`authors_schedule`
    over the plan's layers) against the built encoder and the system's plan."""
    where = f"{where}.stochastic_bits"
    if not isinstance(conf, Mapping):
        raise SystemSpecError(f"{where}: expected a mapping {{low, high, probs}}, got {conf!r}")
    unknown = sorted(set(conf) - {"low", "high", "probs"})
    if unknown:
        raise SystemSpecError(f"{where}: unknown field(s) {unknown}; allowed: ['high', 'low', 'probs']")
    low, high = conf.get("low", 1), conf.get("high", 2)
    for key, value in (("low", low), ("high", high)):
        try:
            check_bits(value, f"{where}.{key}")
        except UnsupportedBitWidth as err:
            raise SystemSpecError(str(err)) from None
        if value == 0:
            raise SystemSpecError(f"{where}.{key}: must be a bit width, not 0 (full precision)")
    if low == high:
        raise SystemSpecError(f"{where}: low and high are both {low}; nothing to draw")
    if len(set(base.blocks)) != len(base.blocks):
        raise SystemSpecError(f"{where}: the plan runs a block more than once ({list(base.blocks)}); one block "
                              f"cannot hold two precisions in one forward")
    layers = len(base.blocks)
    probs = conf.get("probs")
    if probs is None:
        probs = authors_schedule(layers)
    if not isinstance(probs, Sequence) or isinstance(probs, str):
        raise SystemSpecError(f"{where}.probs: expected a list of {layers} probabilities, got {probs!r}")
    if len(probs) != layers:
        raise SystemSpecError(f"{where}.probs: {len(probs)} probabilities for a plan of {layers} layers "
                              f"(blocks {list(base.blocks)}); give one per layer")
    for i, p in enumerate(probs):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise SystemSpecError(f"{where}.probs[{i}]: a probability must lie in [0, 1], got {p!r}")
    if not base.bits:
        raise SystemSpecError(f"{where}: needs the system's bits (e.g. {{'*': {high}}}) to know what runs at {high} bits")
    switchable = {n: m for n, m in encoder.quantizable_modules().items()
                  if any(n.startswith(f"{encoder.block_name(b)}.") for b in base.blocks)
                  and base.bits_for(n) == high}
    if not switchable:
        raise SystemSpecError(f"{where}: no quantized module of the plan's blocks is at high={high} bits under "
                              f"the system's bits {dict(base.bits)}")
    for n, m in switchable.items():
        if low not in m.weight_quantizer.bit_choices:
            raise SystemSpecError(f"{where}.low: {low} bits is not among the widths the quantizer of '{n}' was built "
                                  f"for {list(m.weight_quantizer.bit_choices)}; add it to quant_conf.bit_choices")
    return StochasticPrecision(int(low), int(high), tuple(float(p) for p in probs), base.bits)


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
        stochastic = None
        if spec.get("stochastic_bits") is not None:
            stochastic = parse_stochastic(spec["stochastic_bits"], encoder, plan, where)
            plan = encoder.check_plan(stochastic.plan(encoder, plan, stochastic.most_likely()))
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
        systems[str(name)] = SystemSpec(str(name), plan, dbits, float(weight), stochastic)
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
