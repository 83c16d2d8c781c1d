"""Execution plans: what an elastic encoder runs on one forward pass.

Every method in this toolkit is a way of choosing plans over one set of physical weights:
nested systems skip blocks and narrow FFNs, foldable systems repeat blocks, quantized systems pick
bit widths. Keeping the plan a small immutable value (rather than
flags scattered over modules) lets a model hold many plans, validate them once at build time, and
switch between them per forward pass without touching the weights.
"""
from __future__ import annotations

import fnmatch
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Union


class PlanError(ValueError):
    """An execution plan that cannot run on the physical encoder; the message names the field."""


@dataclass(frozen=True)
class ExecutionPlan:
    """One way to run an elastic encoder.

    Attributes:
        blocks: physical block index executed at each logical step, in order. ``(0, 1, 2, 3)`` is the
            plain 4-block model, ``(0, 2)`` skips blocks 1 and 3, ``(0, 0, 1, 1)`` repeats blocks.
        ffn_units: active FFN hidden width at each logical step (both macaron FFNs of the block use
            it). The first ``k`` hidden units are kept, so narrower systems are prefixes (nested)
            of wider ones. ``None`` means full width everywhere.
        bits: ordered ``(pattern, bits)`` rules for weight precision, matched with ``fnmatch``
            against module names relative to the encoder (e.g. ``"encoders.*.feed_forward.*"``);
            the first matching rule wins, ``"*"`` is a default, and ``0`` means full precision.
            Empty means every weight stays full precision.
        name: label used in logs, stats and reports.
    """

    blocks: Tuple[int, ...]
    ffn_units: Optional[Tuple[int, ...]] = None
    bits: Tuple[Tuple[str, int], ...] = ()
    name: str = "full"

    #: keys of the YAML form (:meth:`from_config` / :meth:`to_config`): the dataclass fields
    CONFIG_FIELDS: ClassVar[Tuple[str, ...]]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def full(cls, num_blocks: int, name: str = "full") -> "ExecutionPlan":
        """The plan that runs every physical block once at full width and precision."""
        return cls(blocks=tuple(range(num_blocks)), name=name)

    @classmethod
    def from_config(cls, conf: Union[None, Mapping[str, Any], "ExecutionPlan"], num_blocks: int,
                    name: str = "full") -> "ExecutionPlan":
        """Build a plan from YAML-style options.

        Accepted keys: ``blocks`` (list of ints, default all blocks), ``ffn_units`` (int for every
        step or a list with one int per step), ``bits`` (int for every weight, or a mapping
        ``{pattern: bits}`` whose order is kept), ``name``. Unknown keys are rejected so typos in a
        config fail at build time instead of silently running the full model.
        """
        if conf is None:
            return cls.full(num_blocks, name)
        if isinstance(conf, ExecutionPlan):
            return conf
        if not isinstance(conf, Mapping):
            raise PlanError(f"plan '{name}': expected a mapping, got {type(conf).__name__}")
        allowed = set(cls.CONFIG_FIELDS)
        unknown = sorted(set(conf) - allowed)
        if unknown:
            raise PlanError(f"plan '{name}': unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        name = str(conf.get("name", name))
        blocks = conf.get("blocks")
        blocks_t = tuple(range(num_blocks)) if blocks is None else _int_tuple(blocks, name, "blocks")
        units = conf.get("ffn_units")
        if units is None:
            units_t = None
        elif isinstance(units, int) and not isinstance(units, bool):
            units_t = (units,) * len(blocks_t)
        else:
            units_t = _int_tuple(units, name, "ffn_units")
        return cls(blocks=blocks_t, ffn_units=units_t, bits=bits_rules(conf.get("bits"), f"plan '{name}'"), name=name)

    # ------------------------------------------------------------------ queries
    @property
    def depth(self) -> int:
        """Number of logical steps (executed blocks)."""
        return len(self.blocks)

    def uses(self) -> Tuple[int, ...]:
        """For each logical step, how often its block ran at earlier steps (0 = its first use)."""
        return tuple(self.blocks[:step].count(b) for step, b in enumerate(self.blocks))

    def units_at(self, step: int, full_units: int) -> int:
        """Active FFN width at a logical step."""
        return full_units if self.ffn_units is None else self.ffn_units[step]

    def bits_for(self, module_name: str) -> int:
        """Bit width for a module name (0 = full precision): first matching rule wins."""
        return bits_for(self.bits, module_name)

    def validate(self, num_blocks: int, linear_units: int) -> "ExecutionPlan":
        """Check the plan against the physical encoder; raise :class:`PlanError` naming the field."""
        if not self.blocks:
            raise PlanError(f"plan '{self.name}': blocks is empty; at least one block must run")
        for b in self.blocks:
            if not 0 <= b < num_blocks:
                raise PlanError(
                    f"plan '{self.name}': blocks names block {b}, but the encoder has "
                    f"{num_blocks} physical blocks (0..{num_blocks - 1})"
                )
        if self.ffn_units is not None:
            if len(self.ffn_units) != len(self.blocks):
                raise PlanError(
                    f"plan '{self.name}': ffn_units has {len(self.ffn_units)} entries but blocks has "
                    f"{len(self.blocks)}; give one width per logical step or a single int"
                )
            for u in self.ffn_units:
                if not 1 <= u <= linear_units:
                    raise PlanError(
                        f"plan '{self.name}': ffn_units {u} is outside 1..{linear_units} "
                        f"(the physical FFN width, linear_units)"
                    )
        return self

    def to_config(self) -> Dict[str, Any]:
        """YAML-friendly form, the inverse of :meth:`from_config`."""
        conf: Dict[str, Any] = {"name": self.name, "blocks": list(self.blocks)}
        if self.ffn_units is not None:
            conf["ffn_units"] = list(self.ffn_units)
        if self.bits:
            conf["bits"] = {p: b for p, b in self.bits}
        return conf


ExecutionPlan.CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ExecutionPlan))

BitsRules = Tuple[Tuple[str, int], ...]


def bits_for(rules: BitsRules, module_name: str) -> int:
    """First ``(pattern, bits)`` rule whose ``fnmatch`` pattern matches ``module_name``; 0 if none."""
    return next((b for p, b in rules if fnmatch.fnmatchcase(module_name, p)), 0)


def bits_rules(value: Any, where: str) -> BitsRules:
    """Normalise a YAML ``bits`` value (int, mapping or list of pairs) to ordered rules. Widths are
    checked by the quantizers, which own the list of supported widths."""
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (("*", value),)
    items = value.items() if isinstance(value, Mapping) else value
    rules = []
    for item in items:
        try:
            pattern, nbits = item
        except (TypeError, ValueError):
            raise PlanError(f"{where}: bits entries must be (pattern, bits) pairs, got {item!r}") from None
        if isinstance(nbits, bool) or not isinstance(nbits, int):
            raise PlanError(f"{where}: bits for '{pattern}' must be an integer, got {nbits!r}")
        rules.append((str(pattern), nbits))
    return tuple(rules)


def _int_tuple(value: Any, plan: str, fieldname: str) -> Tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise PlanError(f"plan '{plan}': {fieldname} must be a list of integers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise PlanError(f"plan '{plan}': {fieldname} must contain integers, got {v!r}")
        out.append(v)
    return tuple(out)
