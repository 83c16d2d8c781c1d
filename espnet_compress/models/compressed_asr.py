"""``compressed``: ESPnet's hybrid CTC/attention model holding one or many compressed systems.

* Decoder quantization (``decoder_quant``): the lossless 4-bit paper quantizes encoder *and*
  decoder; ESPnet builds the decoder from its own ``decoder_choices``, so it is a model option.
* Multi-system training (``systems``): the all-in-one supernet and the foldable model train
  several systems of one set of weights in one pass,
  ``L = L_largest + sum_i w_i L_i + kl_weight sum_i KL(stopgrad(p_largest) || p_i)``.
  Each system's ``L`` is ESPnet's own hybrid CTC/attention loss (the stock forward runs once per
  system with that system's plan), so nothing of ESPnet's loss is re-implemented.
* Packed checkpoints load through the stock programs (pre-hook expands them).
"""
from __future__ import annotations

import logging
import os
import contextlib
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from espnet2.asr.espnet_model import ESPnetASRModel
from espnet2.torch_utils.device_funcs import force_gatherable

from espnet_compress.models.systems import (
    SystemSampler,
    SystemSpec,
    SystemSpecError,
    parse_systems,
    weight_bits,
)
from espnet_compress.quant.api import set_bits

from espnet_compress.quant.api import QuantConfig, quantize_
from espnet_compress.quant.inference import freeze_for_inference
from espnet_compress.quant.packed import PackedModelError, is_packed, unpack_state_dict
from espnet_compress.utils.signature import merge_signature, reject_unknown_options


@merge_signature(ESPnetASRModel.__init__)
class CompressedASRModel(ESPnetASRModel):
    """``ESPnetASRModel`` plus compression options (``model_conf``).

    Args:
        decoder_quant: :class:`~espnet_compress.quant.api.QuantConfig` options for every Linear of
            the decoder (attention projections, FFNs, output layer); the token embedding stays fp32.
            ``None`` keeps the decoder in full precision.
        systems: ``{name: {blocks, ffn_units, bits, decoder_bits, weight}}``; ``None`` = one system.
        largest: the teacher system (default: the first listed).
        kl_weight: weight of ``KL(stopgrad(p_largest) || p_i)`` per non-largest system.
        kl_target: which distributions the KL compares: ``decoder`` (teacher-forced token
            posteriors, the main score of joint decoding, default), ``ctc`` (frame posteriors; all
            systems share the frame rate) or ``both`` (mean of the two).
        sampling: ``all`` systems every step, or ``sandwich`` (largest + smallest + random ones).
        num_random_systems: random systems per step in ``sandwich`` mode.
        sampling_seed: seed of the per-step draw (identical on every DDP rank).
        decode_system: system used at inference (default: largest); the environment variable
            ``ESPNET_COMPRESS_SYSTEM`` overrides it for stock programs such as ``asr_inference``.
        **espnet_kwargs: every ``ESPnetASRModel`` option (``ctc_weight``, ``lsm_weight``, ...).
    """

    KL_TARGETS = ("decoder", "ctc", "both")

    def __init__(self, *args: Any, decoder_quant: Optional[Mapping[str, Any]] = None,
                 systems: Optional[Mapping[str, Any]] = None, largest: Optional[str] = None,
                 kl_weight: float = 0.1, kl_target: str = "decoder", sampling: str = "all",
                 num_random_systems: int = 1, sampling_seed: int = 0, decode_system: Optional[str] = None,
                 **espnet_kwargs: Any) -> None:
        reject_unknown_options(type(self), espnet_kwargs, "model_conf")
        super().__init__(*args, **espnet_kwargs)
        self.decoder_quant = None
        if decoder_quant is not None:
            if self.decoder is None:
                raise ValueError("model_conf.decoder_quant is set but the model has no decoder")
            self.decoder_quant = QuantConfig.from_config(decoder_quant, "model_conf.decoder_quant")
            quantize_(self.decoder, self.decoder_quant)
        self._setup_systems(systems, largest, kl_weight, kl_target, sampling, num_random_systems,
                            sampling_seed, decode_system)
        self._packed_header: Optional[Dict[str, Any]] = None
        self._register_load_state_dict_pre_hook(self._unpack_packed_state, with_module=False)
        self.register_load_state_dict_post_hook(self._freeze_after_packed_load)

    # ------------------------------------------------------------------ packed checkpoints
    def _unpack_packed_state(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        """Expand a packed checkpoint in place, so stock ``load_state_dict`` (and hence
        ``Speech2Text``/``asr_inference``, which load with ``strict=False``) sees float weights.
        Every parameter must be present: a silent partial load would decode with random weights."""
        if prefix or not is_packed(state_dict):
            return
        tensors, header = unpack_state_dict(state_dict, "packed checkpoint")
        expected = set(self.state_dict())
        missing: List[str] = sorted(expected - set(tensors))
        extra: List[str] = sorted(set(tensors) - expected)
        if missing or extra:
            raise PackedModelError(
                f"packed checkpoint does not match the model built from its config: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        state_dict.clear()
        state_dict.update(tensors)
        self._packed_header = header

    def _freeze_after_packed_load(self, module: torch.nn.Module, incompatible_keys: Any) -> None:
        """A packed model is a deployment model: quantize each weight once, pick the CPU kernel
        (``ESPNET_COMPRESS_KERNEL`` = auto | dequant | int8 | int4; default auto)."""
        if self._packed_header is None:
            return
        self.inference_paths = freeze_for_inference(self, os.environ.get("ESPNET_COMPRESS_KERNEL", "auto"))
        self._packed_header = None
        logging.getLogger(__name__).info("loaded packed checkpoint; quantized layers frozen for inference")

    # ------------------------------------------------------------------ systems
    def _setup_systems(self, systems: Optional[Mapping[str, Any]], largest: Optional[str], kl_weight: float,
                       kl_target: str, sampling: str, num_random: int, seed: int,
                       decode_system: Optional[str]) -> None:
        self.systems: Dict[str, SystemSpec] = {}
        self.active_system: Optional[str] = None
        if systems is None:
            if largest or decode_system:
                raise SystemSpecError("model_conf.largest/decode_system need model_conf.systems")
            return
        self.systems = parse_systems(systems, self.encoder, self.decoder)
        self.largest = largest if largest is not None else next(iter(self.systems))
        if self.largest not in self.systems:
            raise SystemSpecError(f"model_conf.largest: '{self.largest}' is not a system ({list(self.systems)})")
        if kl_target not in self.KL_TARGETS:
            raise SystemSpecError(f"model_conf.kl_target: '{kl_target}' unknown; allowed: {list(self.KL_TARGETS)}")
        if kl_weight < 0:
            raise SystemSpecError(f"model_conf.kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight, self.kl_target = float(kl_weight), kl_target
        costs = {n: weight_bits(s, self.encoder) for n, s in self.systems.items()}
        smallest = min(costs, key=costs.get)
        self.sampler = SystemSampler(list(self.systems), self.largest, smallest, sampling, num_random, seed)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long), persistent=False)
        self._captured: Dict[str, torch.Tensor] = {}
        self.decoder.register_forward_hook(self._capture("decoder"))
        self.ctc.register_forward_hook(self._capture("ctc"))
        self.ctc.ctc_lo.register_forward_hook(self._capture("ctc_logits"))
        self.use_system(os.environ.get("ESPNET_COMPRESS_SYSTEM") or decode_system or self.largest)
        self.encoder.apply_env_plan()

    def _capture(self, key: str):
        """Forward hook keeping the last output of a sub-module (for the distillation term)."""

        def hook(module: torch.nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
            if key == "ctc":
                self._captured["ctc_lens"] = inputs[1]
            elif key == "decoder":
                self._captured["decoder"] = output[0] if isinstance(output, tuple) else output
            else:
                self._captured[key] = output

        return hook

    def use_system(self, name: str) -> SystemSpec:
        """Make ``name`` the system that ``encode``/``forward``/decoding run."""
        if name not in self.systems:
            raise SystemSpecError(f"unknown system '{name}'; this model holds {list(self.systems)}")
        spec = self.systems[name]
        self.encoder.set_plan(spec.plan)
        if self.decoder is not None:
            set_bits(self.decoder, (("*", spec.decoder_bits),))
        self.active_system = name
        return spec

    @contextlib.contextmanager
    def system(self, name: str) -> Iterator[SystemSpec]:
        """Run the body with system ``name`` active, then restore the previous one."""
        previous = self.active_system
        try:
            yield self.use_system(name)
        finally:
            if previous is not None:
                self.use_system(previous)

    def forward(self, speech: torch.Tensor, speech_lengths: torch.Tensor, text: torch.Tensor,
                text_lengths: torch.Tensor, **kwargs: Any):
        """One backward for all active systems; per-system losses appear in ESPnet's stats.

        Every system sees the same augmented batch: the RNG state is rewound before each system,
        so SpecAugment (and dropout, where shapes agree) draw the same masks.
        """
        if not self.systems:
            return super().forward(speech, speech_lengths, text, text_lengths, **kwargs)
        names = self.sampler.draw(int(self.num_steps)) if self.training else list(self.systems)
        if self.training:
            self.num_steps += 1
        if names[0] != self.largest:
            names = [self.largest] + [n for n in names if n != self.largest]
        rng = _RngState.capture(speech.device)
        stats: Dict[str, Optional[torch.Tensor]] = {}
        total: Optional[torch.Tensor] = None
        teacher: Dict[str, torch.Tensor] = {}
        batch_size = speech.shape[0]
        for name in self.systems:
            if name not in names:  # keep the stats keys constant across steps (reported as nan)
                stats.update({f"{key}_{name}": None for key in ("loss", "acc", "kl")})
        for name in names:
            rng.restore()
            # Without a frontend (extracted features) ESPnet's encode() hands ``speech`` itself to
            # SpecAugment and GlobalMVN, which modify it IN PLACE when it needs no grad: later systems
            # would see an augmented, twice-normalized batch, and backward fails on the tensor saved
            # by the first system. Each system gets its own copy of the features.
            inputs = speech.clone() if self.frontend is None else speech
            with self.system(name):
                loss, sys_stats, _ = super().forward(inputs, speech_lengths, text, text_lengths, **kwargs)
            captured = dict(self._captured)
            if name == self.largest:
                teacher = {k: v.detach() for k, v in captured.items()}
                total = loss
                stats.update({k: v for k, v in sys_stats.items() if k != "loss"})
                stats[f"loss_{name}"] = loss.detach()
                stats[f"acc_{name}"] = sys_stats.get("acc")
                continue
            kl = self._kl(teacher, captured, text_lengths)
            total = total + self.systems[name].weight * loss + self.kl_weight * kl
            stats[f"loss_{name}"] = loss.detach()
            stats[f"acc_{name}"] = sys_stats.get("acc")
            stats[f"kl_{name}"] = kl.detach()
        stats["loss"] = total.detach()
        loss, stats, weight = force_gatherable((total, stats, batch_size), total.device)
        return loss, stats, weight

    def _kl(self, teacher: Dict[str, torch.Tensor], student: Dict[str, torch.Tensor],
            text_lengths: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student), averaged over real (non-padded) tokens or frames."""
        parts = []
        if self.kl_target in ("decoder", "both"):
            t, s = teacher["decoder"], student["decoder"]
            mask = torch.arange(t.shape[1], device=t.device)[None, :] < (text_lengths + 1)[:, None]
            parts.append(_masked_kl(t, s, mask))
        if self.kl_target in ("ctc", "both"):
            t, s = teacher["ctc_logits"], student["ctc_logits"]
            mask = torch.arange(t.shape[1], device=t.device)[None, :] < teacher["ctc_lens"][:, None]
            parts.append(_masked_kl(t, s, mask))
        return sum(parts) / len(parts)


def _masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


class _RngState:
    """Snapshot of the torch RNG(s) on the batch's device, to replay the same random draws."""

    def __init__(self, cpu: torch.Tensor, cuda: Optional[List[torch.Tensor]]) -> None:
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls, device: torch.device) -> "_RngState":
        cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
