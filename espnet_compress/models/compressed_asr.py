"""``compressed``: ESPnet's hybrid CTC/attention model holding one or many compressed systems.

The thin ESPnet-facing class; each job lives next to what it is about:

* decoder quantization (``decoder_quant``): the lossless 4-bit paper quantizes encoder *and*
  decoder; ESPnet builds the decoder from its own ``decoder_choices``, so it is a model option;
* multi-system training (``systems``): :mod:`~espnet_compress.models.multi_system`;
* packed checkpoints through the stock programs: :class:`~espnet_compress.quant.packed.PackedLoading`.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

import torch
from espnet2.asr.espnet_model import ESPnetASRModel
from espnet2.torch_utils.device_funcs import force_gatherable

from espnet_compress.core.norm_stats import SLOT_CONTAINER
from espnet_compress.features.search import search_feature
from espnet_compress.models.multi_system import MultiSystemMixin, multi_system_options
from espnet_compress.models.systems import SystemSpecError
from espnet_compress.quant.api import QuantConfig, quantize_
from espnet_compress.quant.packed import PackedLoading
from espnet_compress.utils.signature import merge_signature, reject_unknown_options

__all__ = ["CompressedASRModel", "multi_system_options"]

log = logging.getLogger(__name__)


@merge_signature(ESPnetASRModel.__init__)
class CompressedASRModel(MultiSystemMixin, ESPnetASRModel):
    """``ESPnetASRModel`` plus compression options (``model_conf``).

    Args:
        decoder_quant: :class:`~espnet_compress.quant.api.QuantConfig` options for every Linear of
            the decoder (attention projections, FFNs, output layer; the token embedding with
            ``embedding: true``; the CTC projection with ``ctc: true``).
            ``None`` keeps the decoder in full precision.
        systems: ``{name: {blocks, ffn_units, bits, decoder_bits, weight, stochastic_bits}}``; ``None`` =
            one system. ``stochastic_bits: {low, high, probs}`` redraws the system's per-layer
            precision every training step (:class:`~espnet_compress.models.systems.StochasticPrecision`).
        largest: the teacher system (default: the first listed).
        kl_weight: weight of ``KL(stopgrad(p_largest) || p_i)`` per non-largest system.
        kl_target: which distributions the KL compares: ``decoder`` (teacher-forced token
            posteriors, the main score of joint decoding, default), ``ctc`` (frame posteriors; all
            systems share the frame rate), ``both`` (mean of the two) or ``hybrid`` (weighted like
            ESPnet's loss: ``ctc_weight`` KL_ctc + ``(1 - ctc_weight)`` KL_att, the one-bit ASR
            authors' co-training loss).
        kl_reduction: ``token`` (KL averaged over real tokens/frames, default) or ``utterance``
            (summed per utterance, averaged over the batch: the scale of ESPnet's CTC and attention
            losses with ``length_normalized_loss: false``, so ``kl_weight`` weighs like a system weight).
        system_loss: ``sum`` (the all-in-one paper's ``L_largest + sum_i (...)``, default) or ``mean``
            (that sum divided by the systems trained in the step: the one-bit ASR authors' code). Under
            Adam the two differ only where the gradient is clipped: a mean keeps ESPnet's ``grad_clip``
            per unit of one system's loss, a sum of n systems reaches the same clip n times sooner.
        sampling: which systems train in a step: ``all``; ``sandwich`` (largest + smallest +
            ``num_random_systems`` others); ``random`` (largest + ``num_random_systems`` others).
            Sampling trades the systems' own updates for cost: each step costs about one forward
            and backward per drawn system, minus what ``share_computation`` saves.
        num_random_systems: random systems per step in ``sandwich``/``random`` mode.
        sampling_seed: seed of the per-step draw (identical on every DDP rank).
        decode_system: system used at inference (default: largest); the environment variable
            ``ESPNET_COMPRESS_SYSTEM`` overrides it for stock programs such as ``asr_inference``.
        share_computation: compute the encoder input layer and common plan prefixes once per step
            for all systems (exact: same losses and gradients; dropout in a shared prefix draws
            one mask for the systems sharing it). ``false`` recomputes them per system.
        **espnet_kwargs: every ``ESPnetASRModel`` option (``ctc_weight``, ``lsm_weight``, ...).
    """

    def __init__(self, *args: Any, decoder_quant: Optional[Mapping[str, Any]] = None,
                 systems: Optional[Mapping[str, Any]] = None, largest: Optional[str] = None,
                 kl_weight: float = 0.1, kl_target: str = "decoder", sampling: str = "all",
                 num_random_systems: int = 1, sampling_seed: int = 0, decode_system: Optional[str] = None,
                 share_computation: bool = True, kl_reduction: str = "token", system_loss: str = "sum",
                 **espnet_kwargs: Any) -> None:
        reject_unknown_options(type(self), espnet_kwargs, "model_conf")
        super().__init__(*args, **espnet_kwargs)
        self.decoder_quant = None
        if decoder_quant is not None:
            if self.decoder is None:
                raise ValueError("model_conf.decoder_quant is set but the model has no decoder")
            self.decoder_quant = QuantConfig.from_config(decoder_quant, "model_conf.decoder_quant")
            quantize_(self.decoder, self.decoder_quant)
            if self.decoder_quant.ctc:
                if self.ctc is None:
                    raise ValueError("model_conf.decoder_quant.ctc is set but the model has no CTC")
                quantize_(self.ctc, self.decoder_quant)  # a system's decoder_bits sets it too
        if not isinstance(share_computation, bool):
            raise SystemSpecError(f"model_conf.share_computation must be true or false, got {share_computation!r}")
        self.share_computation = share_computation
        self._setup_systems(systems, largest, kl_weight, kl_target, sampling, num_random_systems,
                            sampling_seed, decode_system, kl_reduction, system_loss)
        if self.systems and search_feature(self.encoder) is not None:
            raise SystemSpecError("model_conf.systems cannot be combined with encoder_conf.search: the search "
                                  "trains one supernet; derive its architecture, then train systems of that")
        self.packed_loading = PackedLoading(self, fillable=(f".{SLOT_CONTAINER}.", "num_steps"))

    def forward(self, speech: torch.Tensor, speech_lengths: torch.Tensor, text: torch.Tensor,
                text_lengths: torch.Tensor, **kwargs: Any):
        """ESPnet's forward for one system; all active systems in one step when there are several."""
        if not self.systems:
            loss, stats, weight = super().forward(speech, speech_lengths, text, text_lengths, **kwargs)
        else:
            loss, stats, weight = self.multi_system_forward(speech, speech_lengths, text, text_lengths, **kwargs)
        return self._add_feature_terms(loss, stats, weight)

    def _add_feature_terms(self, loss: torch.Tensor, stats: Dict[str, Any], weight: torch.Tensor):
        """Add the encoder features' loss terms (the search's complexity penalty, eq. 4 of the
        lossless-4bit paper) to the loss, and their stats to ESPnet's; ``stats["loss"]`` stays the
        ASR loss, the returned loss is what trains."""
        terms = getattr(self.encoder, "feature_loss_terms", None)
        if terms is None:
            return loss, stats, weight
        term, extra = terms(self)
        if term is not None:
            loss = loss + term
        stats.update(force_gatherable(extra, loss.device))
        return loss, stats, weight
