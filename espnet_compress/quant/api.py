"""``quantize_(module, QuantConfig)``: attach weight quantizers to every matching layer.

Shaped like torchao's ``quantize_(model, config)``: one call converts a built model in place, the
config says which modules and how. Bit widths themselves are *not* fixed here: they are chosen per
forward by an execution plan (``set_bits``), so one quantized model serves every precision.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from espnet_compress.core.plan import bits_for, bits_rules
from espnet_compress.quant.modules import attach_quantizer, is_quantizable, layer_kind
from espnet_compress.quant.quantizers import (QUANTIZERS, SUPPORTED_BITS, BitPlaneQuantizer, MaxScaleQuantizer,
                                              WeightQuantizer, check_bits)


class QuantConfigError(ValueError):
    """A quantization option that cannot be honoured; the message names the option."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a module tree.

    Attributes:
        bits: ordered ``(pattern, bits)`` rules over module names relative to the quantized root;
            first match wins; ``0`` = keep full precision. Given in YAML as an int (every weight) or
            a mapping ``{pattern: bits}`` (e.g. ``{"encoders.*.conv_module.*": 8, "*": 4}``).
        method: ``max`` (scale from max|W|, eq. 5-6 of the lossless 4-bit paper; mean|W| at 1 bit),
            ``lsq`` (learnable tensor-wise step per bit width, for 1-2 bit training), ``std_alpha``
            (the one-bit ASR quantizer) or ``bitplane`` (every width the top bits of the widest
            width's codes: one packed file holds every precision of a nested supernet).
        per_channel: one scale per output channel instead of per tensor (``max``/``bitplane`` only).
        bit_choices: every width a plan may later select for these weights; defaults to the widths
            named in ``bits``. Nested setups list all their systems' precisions here.
        exclude: module-name patterns never quantized (checked before ``bits``).
        conv2d: also quantize Conv2d layers (the ``conv2d*`` subsampling input layer of the
            encoder: about as many MACs as all FFNs, and the largest fp32 group of a 4-bit file).
        embedding: also quantize Embedding layers (the decoder's token embedding).
        output_layer: quantize the layer named ``output_layer`` (the decoder's vocabulary
            projection); ``false`` keeps it fp32 (it is quantized by default, as before).
        ctc: ``model_conf.decoder_quant`` only: also quantize the CTC projection (``ctc.ctc_lo``,
            vocabulary x d: with a 5000-token BPE, 23% of a 4-bit LibriSpeech file when left fp32).
    Linear and Conv1d layers are always candidates; ``per_channel`` applies to every kind.
    """

    bits: Tuple[Tuple[str, int], ...] = (("*", 8),)
    method: str = "max"
    per_channel: bool = False
    bit_choices: Tuple[int, ...] = ()
    exclude: Tuple[str, ...] = ()
    conv2d: bool = False
    embedding: bool = False
    output_layer: bool = True
    ctc: bool = False

    @classmethod
    def from_config(cls, conf: Optional[Mapping[str, Any]], where: str = "quant_conf") -> "QuantConfig":
        if conf is None:
            return cls()
        if isinstance(conf, QuantConfig):
            return conf
        if not isinstance(conf, Mapping):
            raise QuantConfigError(f"{where}: expected a mapping of options, got {type(conf).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(conf) - fields)
        if unknown:
            raise QuantConfigError(f"{where}: unknown option(s) {unknown}; allowed: {sorted(fields)}")
        kwargs: Dict[str, Any] = dict(conf)
        if "bits" in kwargs:
            try:
                kwargs["bits"] = bits_rules(kwargs["bits"], where)
            except ValueError as err:
                raise QuantConfigError(str(err)) from None
        kwargs["bit_choices"] = tuple(kwargs.get("bit_choices", ()))
        kwargs["exclude"] = tuple(kwargs.get("exclude", ()))
        return cls(**kwargs).validate(where)

    def validate(self, where: str = "quant_conf") -> "QuantConfig":
        for option in SWITCHES:
            if not isinstance(getattr(self, option), bool):
                raise QuantConfigError(f"{where}.{option}: expected true or false, got {getattr(self, option)!r}")
        if self.method not in QUANTIZERS:
            raise QuantConfigError(f"{where}: unknown method '{self.method}'; allowed: {sorted(QUANTIZERS)}")
        if self.per_channel and not issubclass(QUANTIZERS[self.method], MaxScaleQuantizer):
            raise QuantConfigError(f"{where}: per_channel is only supported with the max-scaled methods "
                                   f"{sorted(k for k, c in QUANTIZERS.items() if issubclass(c, MaxScaleQuantizer))}")
        for pattern, nbits in self.bits:
            check_bits(nbits, f"{where}.bits['{pattern}']")
        for nbits in self.bit_choices:
            if nbits == 0:
                continue
            check_bits(nbits, f"{where}.bit_choices")
        if issubclass(QUANTIZERS[self.method], BitPlaneQuantizer) and 1 in self.choices():
            raise QuantConfigError(f"{where}: method 'bitplane' nests widths >= 2 only (1 bit is a sign with its "
                                   f"own scale); remove 1 from bits/bit_choices {list(self.choices())}")
        return self

    def choices(self) -> Tuple[int, ...]:
        """Widths each quantizer must support: ``bit_choices`` plus every width in ``bits``."""
        widths = {b for b in self.bit_choices if b} | {b for _, b in self.bits if b}
        return tuple(sorted(widths)) or SUPPORTED_BITS

    def bits_for(self, name: str) -> int:
        return bits_for(self.bits, name)

    def excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def selects(self, name: str, module: torch.nn.Module) -> bool:
        """Whether ``quantize_`` quantizes this module: a quantizable kind switched on, not excluded."""
        kind = layer_kind(module)
        if not is_quantizable(module) or self.excluded(name) or not getattr(self, SWITCHES.get(kind, ""), True):
            return False
        return self.output_layer or name.rsplit(".", 1)[-1] != "output_layer"

    def make_quantizer(self) -> WeightQuantizer:
        cls = QUANTIZERS[self.method]
        if issubclass(cls, MaxScaleQuantizer):
            return cls(self.choices(), per_channel=self.per_channel)
        return cls(self.choices())


#: boolean ``QuantConfig`` options that switch a layer kind of ``modules.LAYER_KINDS`` on
#: (``output_layer`` is by name, not kind)
SWITCHES: Dict[str, str] = {"conv2d": "conv2d", "embedding": "embedding", "output_layer": "output_layer",
                            "ctc": "ctc"}


def quantize_(root: torch.nn.Module, config: QuantConfig) -> Dict[str, torch.nn.Module]:
    """Attach quantizers to every selected layer under ``root`` (:meth:`QuantConfig.selects`); set
    their bits from ``config.bits``. Returns the quantized modules by name (relative to ``root``)."""
    done: Dict[str, torch.nn.Module] = {}
    for name, module in list(root.named_modules()):
        if not name or not config.selects(name, module):
            continue
        attach_quantizer(module, config.make_quantizer())
        module.set_bits(config.bits_for(name))
        done[name] = module
    if not done:
        raise QuantConfigError("quantize_: no Linear/Conv1d module left to quantize (check 'exclude')")
    return done


def quantized_modules(root: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """Modules under ``root`` that carry a weight quantizer, by name."""
    return {n: m for n, m in root.named_modules() if n and hasattr(m, "weight_quantizer")}


def set_bits(root: torch.nn.Module, rules: Sequence[Tuple[str, int]]) -> None:
    """Set every quantized module's width from ordered ``(pattern, bits)`` rules (no match = fp)."""
    for name, module in quantized_modules(root).items():
        module.set_bits(bits_for(rules, name))
