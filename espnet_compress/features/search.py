"""``search``: differentiable architecture search over every FFN's hidden width and low-rank bottleneck
(the lossless-4bit paper's first stage, sections 2-3 and Table 1: Gumbel-softmax DARTS, pipelined and
penalised by parameter count).

Per block and per FFN (both macaron FFNs separately: ESPnet's ``feed_forward_macaron`` and
``feed_forward``, the paper's FW/BN and FW-m/BN-m) the search chooses

* a hidden width among ``widths`` (nested prefixes of the physical ``linear_units``, like
  :class:`~espnet_compress.core.elastic.ElasticFFN`), and/or
* a bottleneck among ``ranks`` for a low-rank factorised FFN (each of its two layers ``W = A B``,
  :class:`~espnet_compress.core.lowrank.LowRankLinear`), with the factors named by
  ``semi_orthogonal`` (default ``SLLS``, the paper's best placement) kept semi-orthogonal by
  Povey et al.'s periodic update.

Candidates are nested slices of one weight, so the mixture over N candidates costs one FFN: hidden
unit ``j`` is scaled by ``m_j = sum of the weights of the candidates wider than j`` (the same for
bottleneck units). For widths this equals the mixture ``sum_i lambda_i FFN_i(x)`` of eq. (2)
exactly (the second layer is linear in the hidden units and the weights sum to one); for
bottlenecks each factorised layer's output is the mixture of its candidates' outputs.

Architecture weights: ``lambda = softmax((alpha + G) / T)`` with Gumbel noise ``G`` in training
(eq. 3, ``method: gumbel``; ``alpha`` are the logits) or plain ``softmax(alpha)`` (``method:
softmax``, the paper's ablation). Evaluation drops the noise (``softmax(alpha / T)``), so as ``T``
anneals, validation measures the architecture the search is converging to. ``T`` anneals
exponentially from ``temperature.initial`` to ``temperature.final`` over ``anneal_steps`` steps
that update ``alpha`` (stage 2 only; the step count is in the checkpoint, so ``--resume`` continues it).

Complexity penalty (eq. 4): ``eta * sum_l sum_i p_i^l C_i^l`` with ``p = softmax(alpha)`` (the
distribution the Gumbel samples come from) and ``C`` the parameter count of each candidate FFN in
**millions** (Table 1's unit); for width and bottleneck searched together the expected count of
the pair. ``target_ratio: r`` penalises only the expected size above ``r`` times the largest
searchable size (``eta * relu(E[C] - r C_max)``): the size is then set by ``r``, ``eta`` is only
how hard it is enforced. ``CompressedASRModel`` adds the penalty to the loss (stat
``search_penalty``), with ``alpha`` (as probabilities ``alpha_<ffn>_w<width>``/``_k<rank>``), the
temperature and the current pick (``search_<ffn>_width``/``_rank``) in the stats that ESPnet logs
and writes to tensorboard.

Pipelined DARTS through the stock ``asr_train`` (``stage``):

* ``weights`` (stage 1): the supernet's weights train with ``alpha`` fixed at zero
  (``freeze_param: [encoder.architecture]``); Gumbel mode trains random relaxed sub-networks at
  ``temperature.initial``, softmax mode the uniform mixture;
* ``arch`` (stage 2): only ``alpha`` trains (``freeze_param`` lists everything else,
  ``--init_param`` the stage-1 model) on the held-out split named by ``held_out`` (made by
  :func:`espnet_compress.pipeline.search.split_held_out`, never the test set).

Both are checked on the first training step (the freezing, the held-out marker file).

``fixed`` is a derived architecture (``python -m espnet_compress.bin.derive_search`` writes it): every
FFN built at its own width and bottleneck, no ``alpha``; ESPnet's Conformer has one
``linear_units`` for all blocks, so per-block widths need this feature (a uniform unfactorised
answer is exported as a stock ``conformer`` instead).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from espnet_compress.core.elastic import ElasticFeedForward, ElasticFFN, ElasticTorchaudioFeedForward
from espnet_compress.core.lowrank import (
    FACTOR_POSITIONS,
    LowRankLinear,
    factor,
    semi_orthogonal_init_,
    semi_orthogonal_step_,
    svd_factors,
)
from espnet_compress.core.plan import ExecutionPlan, PlanError
from espnet_compress.features.base import EncoderFeature

if TYPE_CHECKING:
    from espnet_compress.encoders.elastic import ElasticEncoder

SEARCH_FIELDS = ("widths", "ranks", "method", "temperature", "eta", "target_ratio", "stage", "held_out",
                 "semi_orthogonal", "orthogonal_every", "fixed")
#: options that only a search (not a derived, ``fixed`` architecture) takes
SEARCH_ONLY = ("widths", "ranks", "method", "temperature", "eta", "target_ratio", "stage", "held_out")
METHODS = ("gumbel", "softmax")
STAGES = ("weights", "arch")
TEMPERATURE_FIELDS = ("initial", "final", "anneal_steps")
DEFAULT_TEMPERATURE = {"initial": 1.0, "final": 0.1, "anneal_steps": 1000}
FIXED_FIELDS = ("width", "rank")
RANGE_FIELDS = ("min", "max", "step")
#: the file :func:`espnet_compress.pipeline.search.split_held_out` writes into a held-out split
HELD_OUT_MARKER = "held_out.json"
#: the module holding ``alpha`` on the encoder (``freeze_param: [encoder.architecture]``)
ARCH_MODULE = "architecture"
#: short names of the host's FFNs in stats and ``alpha`` keys
FFN_TAGS = {"feed_forward_macaron": "ffm", "feed_forward": "ff"}


class SearchConfigError(ValueError):
    """A bad ``encoder_conf.search`` option; the message names its YAML path."""


# ---------------------------------------------------------------------------------------- modules
class ArchitectureParameters(torch.nn.Module):
    """The architecture logits ``alpha`` (one vector per searched choice of each FFN) and the step
    counters of the search, in one module so a single ``freeze_param`` prefix selects them."""

    def __init__(self, sizes: Mapping[str, int]) -> None:
        super().__init__()
        self.alpha = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(n)) for k, n in sizes.items()})
        #: training steps (forwards with gradients) of any stage: paces the semi-orthogonal update
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        #: training steps that updated ``alpha``: the temperature schedule's clock (stage 2 only)
        self.register_buffer("arch_steps", torch.zeros((), dtype=torch.long))


class SearchableFFN:
    """Mixin over :class:`ElasticFFN`: the hidden units and the bottleneck units are scaled by the
    search's masks (``None``: all units, as for a derived, ``fixed`` FFN)."""

    search_feature: "SearchFeature"
    search_key: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width_mask, rank_mask = self.search_feature.masks(self.search_key, self.training)
        h = self.hidden(_linear(self.first, x, rank_mask))
        if width_mask is not None:
            h = h * width_mask
        return self.output(_linear(self.second, h, rank_mask))


class SearchableFeedForward(SearchableFFN, ElasticFeedForward):
    """ESPnet's position-wise FFN under the search."""


class SearchableTorchaudioFeedForward(SearchableFFN, ElasticTorchaudioFeedForward):
    """torchaudio's wav2vec2/HuBERT FFN under the search."""


_SEARCHABLE = {ElasticFeedForward: SearchableFeedForward, ElasticTorchaudioFeedForward: SearchableTorchaudioFeedForward}


def _linear(layer: torch.nn.Module, x: torch.Tensor, rank_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return layer(x, rank_mask) if isinstance(layer, LowRankLinear) else layer(x)


# ---------------------------------------------------------------------------------------- choices
@dataclasses.dataclass(frozen=True)
class FFNChoices:
    """The candidates of one FFN: widths (``(units,)`` when not searched) and bottlenecks
    (``(None,)``: not factorised)."""

    key: str
    block: int
    name: str
    model_dim: int
    units: int
    widths: Tuple[int, ...]
    ranks: Tuple[Optional[int], ...]

    def params(self, width: int, rank: Optional[int]) -> int:
        """Parameters of this FFN at ``width`` and ``rank`` (two layers with biases)."""
        d = self.model_dim
        weights = 2 * d * width if rank is None else 2 * rank * (d + width)
        return weights + width + d

    def cost_table(self) -> torch.Tensor:
        """``C[i, j]``: parameters (millions) at width ``widths[i]`` and rank ``ranks[j]``."""
        return torch.tensor([[self.params(w, k) / 1e6 for k in self.ranks] for w in self.widths])


def _int_list(value: Any, where: str) -> Tuple[int, ...]:
    """A YAML list of ints, or ``{min, max, step}`` (both ends included, like the paper's ranges)."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(RANGE_FIELDS))
        missing = [k for k in RANGE_FIELDS if k not in value]
        if unknown or missing:
            raise SearchConfigError(f"{where}: a range needs exactly {list(RANGE_FIELDS)}, got {sorted(value)}")
        lo, hi, step = (value[k] for k in RANGE_FIELDS)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi, step)) or step <= 0 or hi < lo:
            raise SearchConfigError(f"{where}: range must be integers with min <= max and step > 0, got {dict(value)}")
        return tuple(range(lo, hi + 1, step))
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise SearchConfigError(f"{where}: expected a non-empty list of integers or {{min, max, step}}, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SearchConfigError(f"{where}: expected integers, got {v!r}")
        if v <= 0:
            raise SearchConfigError(f"{where}: {v} is not a positive size")
        out.append(v)
    if len(set(out)) != len(out):
        raise SearchConfigError(f"{where}: duplicate candidates in {out}")
    return tuple(sorted(out))


def _number(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SearchConfigError(f"{where}: expected a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise SearchConfigError(f"{where}: must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def parse_eta(value: Any, where: str = "eta") -> float:
    """The penalty weight: a number >= 0 (0: no penalty)."""
    return _number(value, where)


# ---------------------------------------------------------------------------------------- the feature
class SearchFeature(EncoderFeature):
    """``search`` options (see the module docstring):

    * ``widths``: candidate hidden widths, a list or ``{min, max, step}``; each in 1..``linear_units``;
    * ``ranks``: candidate bottlenecks of a low-rank factorised FFN; each at most the model dimension
      and the smallest width (a bottleneck narrower than both sides of every layer it factorises);
    * ``method``: ``gumbel`` (default) or ``softmax``;
    * ``temperature``: ``{initial, final, anneal_steps}`` (Gumbel only; must anneal: final < initial);
    * ``eta`` (default 0) and ``target_ratio`` (optional, in (0, 1]): the complexity penalty;
    * ``stage``: ``weights`` (default, stage 1) or ``arch`` (stage 2, needs ``held_out``);
    * ``held_out``: the held-out data dir of stage 2 (holds ``held_out.json``);
    * ``semi_orthogonal``: four letters S/L for the factors (first layer's projection and affine
      part, second layer's projection and affine part), default ``SLLS``; ``orthogonal_every``:
      steps between semi-orthogonal updates (default 4, Kaldi's);
    * ``fixed``: a derived architecture, ``{width: {<ffn>: [per block]}, rank: {<ffn>: [per block]}}``.
    """

    KEY = "search"

    def __init__(self, conf: Optional[Mapping[str, Any]], where: str) -> None:
        super().__init__(conf, where)
        c = self.conf
        unknown = sorted(set(c) - set(SEARCH_FIELDS))
        if unknown:
            raise SearchConfigError(f"{where}: unknown option(s) {unknown}; allowed: {list(SEARCH_FIELDS)}")
        self.fixed: Optional[Dict[str, Dict[str, List[int]]]] = None
        if c.get("fixed") is not None:
            extra = [k for k in SEARCH_ONLY if k in c]
            if extra:
                raise SearchConfigError(f"{where}: {extra} are search options; 'fixed' is a derived architecture "
                                        f"that trains like any model (remove them or remove 'fixed')")
            self.fixed = self._parse_fixed(c["fixed"], f"{where}.fixed")
        self.widths = None if c.get("widths") is None else _int_list(c["widths"], f"{where}.widths")
        self.ranks = None if c.get("ranks") is None else _int_list(c["ranks"], f"{where}.ranks")
        self.method = c.get("method", "gumbel")
        if self.method not in METHODS:
            raise SearchConfigError(f"{where}.method: '{self.method}' unknown; allowed: {list(METHODS)}")
        if self.method == "softmax" and c.get("temperature") is not None:
            raise SearchConfigError(f"{where}.temperature: only method 'gumbel' has a temperature; "
                                    f"plain softmax is softmax(alpha)")
        self.temperature = self._parse_temperature(
            DEFAULT_TEMPERATURE if c.get("temperature") is None else c["temperature"], f"{where}.temperature")
        self.eta = parse_eta(c.get("eta", 0.0), f"{where}.eta")
        self.target_ratio = None if c.get("target_ratio") is None else _number(
            c["target_ratio"], f"{where}.target_ratio", positive=True)
        if self.target_ratio is not None and self.target_ratio > 1:
            raise SearchConfigError(f"{where}.target_ratio: {self.target_ratio} is above 1 (the largest searchable "
                                    f"size); give a fraction in (0, 1]")
        self.stage = c.get("stage", "weights")
        if self.stage not in STAGES:
            raise SearchConfigError(f"{where}.stage: '{self.stage}' unknown; allowed: {list(STAGES)} "
                                    f"(weights = stage 1, arch = stage 2)")
        self.held_out = c.get("held_out")
        if self.stage == "arch" and not self.held_out:
            raise SearchConfigError(
                f"{where}.held_out: stage 'arch' (stage 2) updates alpha on held-out data, and none is named; "
                f"make the split with espnet_compress.pipeline.search.split_held_out (never the test set), train "
                f"on it and name it here (or --encoder_conf search.held_out=<dir>)")
        if self.held_out is not None and self.stage != "arch":
            raise SearchConfigError(f"{where}.held_out: only stage 'arch' trains on held-out data")
        so = c.get("semi_orthogonal", "SLLS")
        if not isinstance(so, str) or len(so) != 4 or set(so) - {"S", "L"}:
            raise SearchConfigError(f"{where}.semi_orthogonal: four letters S/L for (first layer projection, "
                                    f"first layer affine, second layer projection, second layer affine), e.g. SLLS; "
                                    f"got {so!r}")
        if "semi_orthogonal" in c and self.ranks is None and not (self.fixed and self.fixed.get("rank")):
            raise SearchConfigError(f"{where}.semi_orthogonal: applies to low-rank factors; give {where}.ranks")
        self.semi_orthogonal = so
        #: the (layer, part) positions of FACTOR_POSITIONS whose letter is S
        self.orthogonal = frozenset(pos for pos, letter in zip(FACTOR_POSITIONS, so) if letter == "S")
        every = c.get("orthogonal_every", 4)
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise SearchConfigError(f"{where}.orthogonal_every: a positive number of steps, got {every!r}")
        self.orthogonal_every = every
        if self.fixed is None and self.widths is None and self.ranks is None:
            raise SearchConfigError(f"{where}: nothing to search; give widths and/or ranks (or fixed)")
        self.choices: Dict[str, FFNChoices] = {}
        self.arch: Optional[ArchitectureParameters] = None
        self._pinned: Optional[Dict[str, Dict[str, int]]] = None
        self._pending = False
        self._checked = False
        self._fixed_steps = 0
        self._tables: Dict[Tuple[str, str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ parsing
    def _parse_temperature(self, value: Any, where: str) -> Dict[str, float]:
        if not isinstance(value, Mapping):
            raise SearchConfigError(f"{where}: expected {{initial, final, anneal_steps}}, got {value!r}")
        unknown = sorted(set(value) - set(TEMPERATURE_FIELDS))
        if unknown:
            raise SearchConfigError(f"{where}: unknown option(s) {unknown}; allowed: {list(TEMPERATURE_FIELDS)}")
        t = {**DEFAULT_TEMPERATURE, **value}
        initial = _number(t["initial"], f"{where}.initial", positive=True)
        final = _number(t["final"], f"{where}.final", positive=True)
        steps = t["anneal_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise SearchConfigError(f"{where}.anneal_steps: the schedule never anneals unless it is a positive "
                                    f"number of steps, got {steps!r}")
        if final >= initial:
            raise SearchConfigError(f"{where}: final {final} >= initial {initial}: the schedule never anneals "
                                    f"(eq. 3 needs T to fall so the weights approach one-hot)")
        return {"initial": initial, "final": final, "anneal_steps": steps}

    def _parse_fixed(self, value: Any, where: str) -> Dict[str, Dict[str, List[int]]]:
        if not isinstance(value, Mapping) or set(value) - set(FIXED_FIELDS) or not value:
            raise SearchConfigError(f"{where}: expected {{width: {{<ffn>: [per block]}}, rank: {{...}}}}, got {value!r}")
        out: Dict[str, Dict[str, List[int]]] = {}
        for kind, per_ffn in value.items():
            if not isinstance(per_ffn, Mapping):
                raise SearchConfigError(f"{where}.{kind}: expected {{<ffn module>: [one size per block]}}, got {per_ffn!r}")
            out[kind] = {}
            for ffn, sizes in per_ffn.items():
                if not isinstance(sizes, Sequence) or isinstance(sizes, str):
                    raise SearchConfigError(f"{where}.{kind}.{ffn}: expected a list with one size per block")
                for s in sizes:
                    if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
                        raise SearchConfigError(f"{where}.{kind}.{ffn}: {s!r} is not a positive size")
                out[kind][str(ffn)] = list(sizes)
        return out

    # ------------------------------------------------------------------ hooks
    def attach(self, encoder: "ElasticEncoder") -> None:
        if "quant_conf" in encoder.features and self.fixed is None:
            raise SearchConfigError(f"{self.where}: a search cannot be combined with encoder_conf.quant_conf; search "
                                    f"the architecture first, then quantize the derived model (search.fixed, the "
                                    f"paper's order)")
        blocks = list(encoder.blocks.physical_blocks())
        for b, block in enumerate(blocks):
            for name, ffn in block.named_children():
                if not isinstance(ffn, ElasticFFN):
                    continue
                key = f"b{b}_{FFN_TAGS.get(name, name)}"
                d, units = ffn.first.in_features, ffn.full_units
                widths, ranks = self._candidates(b, name, d, units)
                self.choices[key] = FFNChoices(key, b, name, d, units, widths, ranks)
                self._convert(ffn, key, widths, ranks)
        if not self.choices:
            raise SearchConfigError(f"{self.where}: the encoder has no FFNs to search")
        if self.fixed is not None:
            names = {c.name for c in self.choices.values()}
            for kind, per_ffn in self.fixed.items():
                for ffn in sorted(set(per_ffn) - names):
                    raise SearchConfigError(f"{self.where}.fixed.{kind}.{ffn}: no such FFN; the blocks have {sorted(names)}")
        else:
            sizes = {}
            for key, ch in self.choices.items():
                if self.widths is not None:
                    sizes[f"{key}_width"] = len(ch.widths)
                if self.ranks is not None:
                    sizes[f"{key}_rank"] = len(ch.ranks)
            self.arch = ArchitectureParameters(sizes)
            encoder.add_module(ARCH_MODULE, self.arch)
        encoder.register_forward_pre_hook(self._before_forward)

    def _candidates(self, block: int, name: str, d: int, units: int) -> Tuple[Tuple[int, ...], Tuple[Optional[int], ...]]:
        """Validated (widths, ranks) of one FFN: the search's candidates or the fixed sizes."""
        if self.fixed is not None:
            picked: Dict[str, Optional[int]] = {}
            for kind in FIXED_FIELDS:
                sizes = self.fixed.get(kind, {}).get(name)
                where = f"{self.where}.fixed.{kind}.{name}"
                if sizes is None:
                    picked[kind] = None
                    continue
                if len(sizes) <= block:
                    raise SearchConfigError(f"{where}: {len(sizes)} sizes for {block + 1}+ blocks; give one per block")
                picked[kind] = sizes[block]
            width = units if picked["width"] is None else picked["width"]
            if width > units:
                raise SearchConfigError(f"{self.where}.fixed.width.{name}: {width} (block {block}) is above the "
                                        f"physical FFN width linear_units={units}")
            rank = picked["rank"]
            if rank is not None and rank > min(d, width):
                raise SearchConfigError(f"{self.where}.fixed.rank.{name}: bottleneck {rank} (block {block}) is larger "
                                        f"than the layer it factorises (model dim {d}, width {width})")
            return (width,), (rank,)
        widths = (units,) if self.widths is None else self.widths
        if max(widths) > units:
            raise SearchConfigError(f"{self.where}.widths: {[w for w in widths if w > units]} above the physical FFN "
                                    f"width (linear_units: {units}); candidates are prefixes of that FFN")
        if self.ranks is None:
            return widths, (None,)
        limit = min(d, min(widths))
        if max(self.ranks) > limit:
            raise SearchConfigError(f"{self.where}.ranks: {[k for k in self.ranks if k > limit]} larger than the layers "
                                    f"they factorise (model dim {d}, smallest width {min(widths)}): a bottleneck must "
                                    f"be narrower than both sides")
        return widths, tuple(self.ranks)

    def _convert(self, ffn: ElasticFFN, key: str, widths: Sequence[int], ranks: Sequence[Optional[int]]) -> None:
        """Make ``ffn`` searchable; build its layers at the largest candidate (a fixed FFN at its size)."""
        first, second = ffn.first, ffn.second
        d, width, rank = first.in_features, max(widths), (None if ranks[0] is None else max(ranks))
        kw = {"device": first.weight.device, "dtype": first.weight.dtype}
        if rank is not None:
            new_first = LowRankLinear(d, width, rank, bias=first.bias is not None).to(**kw)
            new_second = LowRankLinear(width, d, rank, bias=second.bias is not None).to(**kw)
            for layer, part in FACTOR_POSITIONS:  # in order: each init draws from the global RNG
                if (layer, part) in self.orthogonal:
                    semi_orthogonal_init_(factor(new_first if layer == "first" else new_second, part))
            setattr(ffn, ffn.IN, new_first)
            setattr(ffn, ffn.OUT, new_second)
        elif width != first.out_features:
            setattr(ffn, ffn.IN, torch.nn.Linear(d, width, bias=first.bias is not None, **kw))
            setattr(ffn, ffn.OUT, torch.nn.Linear(width, d, bias=second.bias is not None, **kw))
        ffn.__class__ = _SEARCHABLE[type(ffn)]
        ffn.search_feature, ffn.search_key = self, key

    def check(self, encoder: "ElasticEncoder", plan: ExecutionPlan) -> None:
        if plan.ffn_units is not None:
            raise PlanError(f"plan '{plan.name}': ffn_units cannot be combined with {self.where}: the search "
                            f"chooses each FFN's width (derive the architecture with espnet_compress.bin.derive_search)")

    # ------------------------------------------------------------------ architecture weights
    @property
    def searching(self) -> bool:
        return self.arch is not None

    def temperature_now(self) -> float:
        """``T`` after the stage-2 steps taken so far (exponential from initial to final)."""
        t = self.temperature
        done = 0 if self.arch is None else int(self.arch.arch_steps)
        frac = min(done / t["anneal_steps"], 1.0)
        return t["initial"] * (t["final"] / t["initial"]) ** frac

    def probabilities(self, key: str, kind: str) -> Optional[torch.Tensor]:
        """``softmax(alpha)`` of one choice (``kind``: width/rank), ``None`` when it is not searched."""
        if self.arch is None or f"{key}_{kind}" not in self.arch.alpha:
            return None
        return torch.softmax(self.arch.alpha[f"{key}_{kind}"], dim=0)

    def _weights(self, key: str, kind: str, training: bool) -> Optional[torch.Tensor]:
        """lambda of one choice for this forward (eq. 3 / plain softmax / the pinned pick)."""
        name = f"{key}_{kind}"
        if self.arch is None or name not in self.arch.alpha:
            return None
        alpha = self.arch.alpha[name]
        if self._pinned is not None:
            return torch.nn.functional.one_hot(torch.tensor(self._pinned[key][kind], device=alpha.device),
                                               alpha.numel()).to(alpha.dtype)
        if self.method == "softmax":
            return torch.softmax(alpha, dim=0)
        t = self.temperature_now()
        if training:
            u = torch.rand_like(alpha).clamp(1e-10, 1.0 - 1e-7)
            return torch.softmax((alpha - torch.log(-torch.log(u))) / t, dim=0)
        return torch.softmax(alpha / t, dim=0)

    def _table(self, key: str, kind: str, device: torch.device) -> torch.Tensor:
        """``T[i, j] = 1`` if unit ``j`` belongs to candidate ``i`` (mask = lambda @ T)."""
        cache = (key, kind, device)
        if cache not in self._tables:
            ch = self.choices[key]
            sizes = ch.widths if kind == "width" else ch.ranks
            full = max(sizes)
            self._tables[cache] = (torch.arange(full, device=device)[None, :]
                                   < torch.tensor(sizes, device=device)[:, None]).float()
        return self._tables[cache]

    def masks(self, key: str, training: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(hidden-unit mask, bottleneck mask) of one FFN for this forward; ``None`` = all units."""
        out = []
        for kind in ("width", "rank"):
            lam = self._weights(key, kind, training)
            out.append(None if lam is None else lam @ self._table(key, kind, lam.device).to(lam.dtype))
        return out[0], out[1]

    # ------------------------------------------------------------------ picks and cost
    def pick(self) -> Dict[str, Dict[str, int]]:
        """The argmax candidate index of every choice: ``{ffn key: {"width": i, "rank": j}}``."""
        out: Dict[str, Dict[str, int]] = {}
        for key in self.choices:
            out[key] = {}
            for kind in ("width", "rank"):
                p = self.probabilities(key, kind)
                out[key][kind] = 0 if p is None else int(torch.argmax(p))
        return out

    def sizes(self, pick: Mapping[str, Mapping[str, int]]) -> Dict[str, Tuple[int, Optional[int]]]:
        """(width, rank) of every FFN under a pick of candidate indices."""
        return {k: (ch.widths[pick[k]["width"]], ch.ranks[pick[k]["rank"]]) for k, ch in self.choices.items()}

    def architecture(self, pick: Optional[Mapping[str, Mapping[str, int]]] = None) -> Dict[str, Dict[str, List[int]]]:
        """A pick (default: the argmax) as the ``fixed`` option of a derived model."""
        sizes = self.sizes(self.pick() if pick is None else pick)
        out: Dict[str, Dict[str, List[int]]] = {"width": {}}
        factorised = any(r is not None for _, r in sizes.values())
        if factorised:
            out["rank"] = {}
        for key, ch in sorted(self.choices.items(), key=lambda kv: (kv[1].name, kv[1].block)):
            w, r = sizes[key]
            out["width"].setdefault(ch.name, []).append(w)
            if factorised:
                out["rank"].setdefault(ch.name, []).append(r)
        return out

    def expected_params(self) -> torch.Tensor:
        """``sum_l p_w^T C p_k`` (millions): the searchable FFNs' expected parameter count under
        ``softmax(alpha)``; differentiable in ``alpha``."""
        total = None
        for key, ch in self.choices.items():
            table = ch.cost_table()
            pw, pk = self.probabilities(key, "width"), self.probabilities(key, "rank")
            if pw is not None:
                table = table.to(pw.device)
                term = pw @ table
            else:
                term = table[0]
            term = (term @ pk.to(term.device)) if pk is not None else term[0]
            total = term if total is None else total + term
        return total

    def max_params(self) -> float:
        """Searchable FFN parameters (millions) at the largest candidates."""
        return sum(ch.cost_table().max().item() for ch in self.choices.values())

    def penalty(self) -> torch.Tensor:
        """Eq. (4): ``eta * E[C]``; with ``target_ratio``, ``eta * relu(E[C] - ratio * C_max)``."""
        expected = self.expected_params()
        if self.target_ratio is not None:
            expected = torch.relu(expected - self.target_ratio * self.max_params())
        return self.eta * expected

    # ------------------------------------------------------------------ training hooks
    def _before_forward(self, encoder: torch.nn.Module, args: Any) -> None:
        """Per training step (training mode with gradients): count steps, keep the constrained
        factors semi-orthogonal, and make sure the previous step's penalty reached the loss."""
        if not encoder.training or not torch.is_grad_enabled():
            return
        if self._pending:
            raise RuntimeError(
                f"{self.where}: the complexity penalty of the previous training step was never added to the loss; "
                f"the search needs 'model: compressed' (CompressedASRModel adds it), not ESPnet's 'espnet' model")
        steps = self.arch
        if steps is not None:
            steps.steps += 1
            if any(p.requires_grad for p in self.arch.parameters()):
                steps.arch_steps += 1
            self._pending = True
            due = int(steps.steps) % self.orthogonal_every == 0
        else:  # a derived model being fine-tuned: no counters in its checkpoint
            self._fixed_steps += 1
            due = self._fixed_steps % self.orthogonal_every == 0
        if due:
            for weight in self.constrained_factors(encoder):
                if weight.requires_grad:
                    semi_orthogonal_step_(weight)

    def constrained_factors(self, encoder: torch.nn.Module) -> List[torch.nn.Parameter]:
        """The factors the ``semi_orthogonal`` letters constrain, in every FFN."""
        out = []
        for ch in self.choices.values():
            module, _ = _located(encoder, ch)
            for layer, part in FACTOR_POSITIONS:
                lin = module.first if layer == "first" else module.second
                if (layer, part) in self.orthogonal and isinstance(lin, LowRankLinear):
                    out.append(factor(lin, part))
        return out

    def loss_terms(self, encoder: "ElasticEncoder", model: torch.nn.Module) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
        """The penalty to add to the loss and the search's stats (alpha, temperature, pick)."""
        if self.arch is None:
            return None, {}
        if encoder.training and torch.is_grad_enabled():
            self._pending = False
            if not self._checked:
                self._check_stage(model)
                self._checked = True
        penalty = self.penalty()
        stats: Dict[str, Any] = {"search_penalty": penalty.detach(),
                                 "search_ffn_params_expected": self.expected_params().detach() * 1e6}
        if self.method == "gumbel":
            stats["search_temperature"] = self.temperature_now()
        pick = self.pick()
        sizes = self.sizes(pick)
        stats["search_ffn_params_pick"] = float(sum(self.choices[k].params(w, r) for k, (w, r) in sizes.items()))
        for key, ch in self.choices.items():
            w, r = sizes[key]
            for kind, cands, tag in (("width", ch.widths, "w"), ("rank", ch.ranks, "k")):
                p = self.probabilities(key, kind)
                if p is None:
                    continue
                stats[f"search_{key}_{kind}"] = float(w if kind == "width" else r)
                for c, value in zip(cands, p.detach()):
                    stats[f"alpha_{key}_{tag}{c}"] = value
        return penalty, stats

    def _check_stage(self, model: torch.nn.Module) -> None:
        """The pipelined-DARTS discipline, checked on the first training step of a run."""
        arch_ids = {id(p) for p in self.arch.parameters()}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in arch_ids]
        alpha_trains = any(p.requires_grad for p in self.arch.parameters())
        arch_prefix = next((n.rsplit(".alpha.", 1)[0] for n, p in model.named_parameters() if id(p) in arch_ids), None)
        if self.stage == "weights":
            if alpha_trains:
                raise SearchConfigError(
                    f"{self.where}.stage: weights (stage 1) trains the supernet with the architecture fixed, but alpha "
                    f"is trainable; add freeze_param: [{arch_prefix}] to the config")
            return
        if trainable:
            tops = sorted({".".join(n.split(".")[:2]) if n.startswith("encoder.") else n.split(".")[0] for n in trainable})
            raise SearchConfigError(
                f"{self.where}.stage: arch (stage 2) updates only alpha, but {len(trainable)} other parameters are "
                f"trainable ({trainable[:3]}...); freeze them with freeze_param: {tops}")
        if not alpha_trains:
            raise SearchConfigError(f"{self.where}.stage: arch (stage 2) but alpha is frozen: nothing would be searched")
        marker = Path(self.held_out) / HELD_OUT_MARKER
        if not marker.is_file():
            raise SearchConfigError(
                f"{self.where}.held_out: {self.held_out} has no {HELD_OUT_MARKER}; stage 2 trains on a held-out split "
                f"of the training data made by espnet_compress.pipeline.search.split_held_out (not the test set)")

    # ------------------------------------------------------------------ derive
    def pinned(self, pick: Mapping[str, Mapping[str, int]]) -> "_Pinned":
        """Context: every forward uses the one-hot weights of ``pick`` (a derived model's computation)."""
        return _Pinned(self, pick)

    def derived_state(self, state: Mapping[str, torch.Tensor], encoder: "ElasticEncoder",
                      pick: Mapping[str, Mapping[str, int]], prefix: str = "encoder.") -> Dict[str, torch.Tensor]:
        """The supernet's ``state`` cut to ``pick``: widths keep the first units (rows of the first
        layer, columns of the second), bottlenecks the first rows of the projections and columns of
        the affine parts; ``alpha`` and the step counters are dropped."""
        sizes = self.sizes(pick)
        cuts: Dict[str, Tuple[Optional[int], Optional[int]]] = {}
        for key, ch in self.choices.items():
            w, r = sizes[key]
            ffn, base = _located(encoder, ch, prefix)
            first, second = f"{base}.{ffn.IN}", f"{base}.{ffn.OUT}"
            if r is None:
                cuts[f"{first}.weight"] = (w, None)
                cuts[f"{first}.bias"] = (w, None)
                cuts[f"{second}.weight"] = (None, w)
            else:
                cuts[f"{first}.proj.weight"] = (r, None)
                cuts[f"{first}.affine.weight"] = (w, r)
                cuts[f"{first}.affine.bias"] = (w, None)
                cuts[f"{second}.proj.weight"] = (r, w)
                cuts[f"{second}.affine.weight"] = (None, r)
        drop = f"{prefix}{ARCH_MODULE}."
        out: Dict[str, torch.Tensor] = {}
        for name, value in state.items():
            if name.startswith(drop):
                continue
            rows, cols = cuts.get(name, (None, None))
            if rows is not None:
                value = value[:rows]
            if cols is not None:
                value = value[:, :cols]
            out[name] = value.clone()
        return out

    def warm_start_state(self, dense: Mapping[str, torch.Tensor], encoder: "ElasticEncoder",
                         prefix: str = "encoder.") -> Dict[str, torch.Tensor]:
        """``dense`` (the state of a trained model with plain FFNs, e.g. the fp32 baseline) turned into
        this supernet's FFN layout, so stage 1 starts from what the baseline learned instead of from
        scratch.

        Widths are prefixes of the dense hidden units (at its full width a width supernet IS the dense
        model); a factorised layer gets the truncated SVD of the dense weight (:func:`svd_factors`: every
        nested bottleneck prefix is the best approximation of its rank, and the ``semi_orthogonal``
        factors start exactly on the constraint). Every other entry of ``dense`` is kept as is; the
        search's own ``alpha`` and counters are not in ``dense`` and keep their initial values.
        """
        out = dict(dense)
        for key, ch in self.choices.items():
            ffn, base = _located(encoder, ch, prefix)
            width = max(ch.widths)
            rank = max(ch.ranks) if ch.ranks[0] is not None else None
            for layer, name, cut_rows in (("first", ffn.IN, True), ("second", ffn.OUT, False)):
                w_key, b_key = f"{base}.{name}.weight", f"{base}.{name}.bias"
                if w_key not in dense:
                    raise KeyError(f"{w_key}: not in the dense state; warm start needs a model with the same encoder "
                                   f"(blocks, FFN names) as {self.where}'s host")
                weight = dense[w_key]
                expect = (ch.units, ch.model_dim) if cut_rows else (ch.model_dim, ch.units)
                if tuple(weight.shape) != expect:
                    raise ValueError(f"{w_key}: shape {tuple(weight.shape)}, but the supernet's FFN {key} is "
                                     f"{expect[0]}x{expect[1]} (model dim {ch.model_dim}, linear_units {ch.units})")
                weight = weight[:width] if cut_rows else weight[:, :width]
                bias = dense.get(b_key)
                if bias is not None and cut_rows:
                    bias = bias[:width]
                del out[w_key]
                out.pop(b_key, None)
                if rank is None:
                    out[w_key] = weight.clone()
                    if bias is not None:
                        out[b_key] = bias.clone()
                    continue
                proj, affine = svd_factors(weight, rank, ((layer, "proj") in self.orthogonal,
                                                          (layer, "affine") in self.orthogonal))
                out[f"{base}.{name}.proj.weight"] = proj
                out[f"{base}.{name}.affine.weight"] = affine
                if bias is not None:
                    out[f"{base}.{name}.affine.bias"] = bias.clone()
        return out


def _located(encoder: "ElasticEncoder", ch: FFNChoices, prefix: str = "encoder.") -> Tuple[ElasticFFN, str]:
    """The FFN module of ``ch`` and its state-dict name (under ``prefix``)."""
    module = getattr(list(encoder.blocks.physical_blocks())[ch.block], ch.name)
    return module, f"{prefix}{encoder.block_name(ch.block)}.{ch.name}"


class _Pinned:
    def __init__(self, feature: SearchFeature, pick: Mapping[str, Mapping[str, int]]) -> None:
        self.feature, self.pick = feature, {k: dict(v) for k, v in pick.items()}

    def __enter__(self) -> SearchFeature:
        self.previous, self.feature._pinned = self.feature._pinned, self.pick
        return self.feature

    def __exit__(self, *exc: Any) -> None:
        self.feature._pinned = self.previous


def search_feature(encoder: torch.nn.Module) -> Optional[SearchFeature]:
    """The encoder's ``search`` feature, if it has one."""
    return getattr(encoder, "features", {}).get(SearchFeature.KEY)
