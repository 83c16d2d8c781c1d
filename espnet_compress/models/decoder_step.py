"""Decode-time step of ESPnet's Transformer decoder in fewer calls (same arithmetic).

Once the decoder's GEMMs are int8 and the source attention's keys and values are computed once per
utterance (:mod:`espnet_compress.models.memory_cache`), one decoding step of the LibriSpeech-100
decoder (6 layers, d 256, one thread, AVX2) spends about 1.6 ms of its 3.7 ms in GEMMs and most of
the rest in ESPnet's layer-by-layer Python: module calls into ``DecoderLayer``,
``MultiHeadedAttention.forward``/``forward_qkv``/``forward_attention``, dropout modules at p=0, a
mask test per attention and LayerNorm wrappers, for a query of one row. Greedy and beam decoding
call that step once per output token, so at 3 tokens per second of audio it is about half of a
packed nested system's decode time.

:class:`LeanDecoderStep` runs ``forward_one_step`` as the same operations in the same order
(layer norms, projections, ``softmax(q k^T / sqrt(d_k)) v``, output projection, residual adds,
feed-forward), calling the layers themselves (any inference path: fp32, int8, dequantized) but
none of the wrappers: bit for bit ESPnet's result with one hypothesis. With beams sharing one
cached source, the beams' queries attend as rows of one product per head instead of one product
per beam (float rounding, as the source cache's own projection). It applies where ESPnet's layer
would compute exactly that: pre-norm layers without ``concat_after``, plain multi-head attention
(no flash attention or SDPA, no q/k norms), a position-wise feed-forward, inference without
autograd, a step with the layer cache (or a first step of one token) whose masks mask nothing; anything else
runs ESPnet's ``forward_one_step``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from espnet.nets.pytorch_backend.transformer.attention import MultiHeadedAttention
from espnet.nets.pytorch_backend.transformer.decoder_layer import DecoderLayer
from espnet.nets.pytorch_backend.transformer.positionwise_feed_forward import PositionwiseFeedForward

from espnet_compress.models.memory_cache import CachedSourceAttention
from espnet_compress.utils.mixin import in_front

log = logging.getLogger(__name__)


def _norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _heads(attention: MultiHeadedAttention, x: torch.Tensor) -> torch.Tensor:
    """(batch, time, d) -> (batch, heads, time, d_k), as ESPnet's ``forward_qkv`` views it."""
    return x.view(x.size(0), -1, attention.h, attention.d_k).transpose(1, 2)


def _context(attention: MultiHeadedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ESPnet's unmasked attention: softmax(q k^T / sqrt(d_k)) v, heads merged, output projection."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(attention.d_k)
    heads = torch.matmul(torch.softmax(scores, dim=-1), v)
    return attention.linear_out(heads.transpose(1, 2).reshape(q.size(0), -1, attention.h * attention.d_k))


def _attention(attention: MultiHeadedAttention, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    q = _heads(attention, attention.linear_q(query))
    return _context(attention, q, _heads(attention, attention.linear_k(keys)),
                    _heads(attention, attention.linear_v(keys)))


def _source_attention(attention: MultiHeadedAttention, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    cached = attention.source_keys_values(memory) if isinstance(attention, CachedSourceAttention) else None
    if cached is None:
        return _attention(attention, query, memory)
    k, v = cached  # (1, heads, frames, d_k): the beams' queries become rows of one product per head
    q = _heads(attention, attention.linear_q(query)).transpose(0, 2)  # (1, heads, beams, d_k)
    return _context(attention, q, k, v).transpose(0, 1)  # (1, beams, d) -> (beams, 1, d)


def _layer_step(layer: DecoderLayer, x: torch.Tensor, memory: torch.Tensor,
                cache: Optional[torch.Tensor]) -> torch.Tensor:
    """ESPnet's ``DecoderLayer.forward`` with a cache (pre-norm, no concat_after) for the last row."""
    h = _norm(layer.norm1, x)
    out = x[:, -1:] + _attention(layer.self_attn, h[:, -1:], h)
    out = out + _source_attention(layer.src_attn, _norm(layer.norm2, out), memory)
    ff = layer.feed_forward
    out = out + ff.w_2(ff.activation(ff.w_1(_norm(layer.norm3, out))))
    return out if cache is None else torch.cat([cache, out], dim=1)


def _plain_attention(attention: Any) -> bool:
    return (isinstance(attention, MultiHeadedAttention) and not attention.use_flash_attn
            and not getattr(attention, "use_sdpa", False)
            and isinstance(attention.q_norm, torch.nn.Identity) and isinstance(attention.k_norm, torch.nn.Identity))


def unsupported_layout(decoder: torch.nn.Module) -> str:
    """Why :class:`LeanDecoderStep` cannot compute ``decoder``'s steps ("" if it can)."""
    if not getattr(decoder, "normalize_before", False):
        return "not a pre-norm decoder (normalize_before false)"
    for i, layer in enumerate(getattr(decoder, "decoders", ())):
        why = ("not ESPnet's DecoderLayer" if not isinstance(layer, DecoderLayer) else
               "post-norm" if not layer.normalize_before else
               "concat_after" if layer.concat_after else
               "sequential attention" if getattr(layer, "sequential_attn", None) is not None else
               "attention with flash attention, SDPA or q/k norms" if not (
                   _plain_attention(layer.self_attn) and _plain_attention(layer.src_attn)) else
               "feed-forward is not PositionwiseFeedForward" if type(layer.feed_forward) is not PositionwiseFeedForward
               else "layer norms are not LayerNorm over the last dimension" if not all(
                   isinstance(n, torch.nn.LayerNorm) and getattr(n, "dim", -1) == -1
                   for n in (layer.norm1, layer.norm2, layer.norm3)) else "")
        if why:
            return f"layer {i}: {why}"
    return ""


def _mask_is_full(mask: Optional[torch.Tensor]) -> bool:
    return mask is None or bool(mask.all())


class LeanDecoderStep:
    """Mixin placed before an ESPnet Transformer decoder class: ``forward_one_step`` in fewer calls
    (module docstring); everything it does not cover goes to the decoder's own method."""

    def forward_one_step(self, tgt: torch.Tensor, tgt_mask: torch.Tensor, memory: torch.Tensor,
                         memory_mask: Optional[torch.Tensor] = None, *, cache: Optional[List[torch.Tensor]] = None,
                         return_hs: bool = False, **kwargs: Any) -> Tuple[Any, List[torch.Tensor]]:
        if (kwargs or self.training or torch.is_grad_enabled() or (cache is None and tgt.size(1) != 1)
                or not _mask_is_full(None if tgt_mask is None else tgt_mask[:, -1])
                or not _mask_is_full(memory_mask)):
            return super().forward_one_step(tgt, tgt_mask, memory, memory_mask, cache=cache, return_hs=return_hs,
                                            **kwargs)
        x = self.embed(tgt)
        new_cache = []
        for i, layer in enumerate(self.decoders):
            x = _layer_step(layer, x, memory, None if cache is None else cache[i])
            new_cache.append(x)
        hidden = self.after_norm(x[:, -1])
        y = hidden if self.output_layer is None else torch.log_softmax(self.output_layer(hidden), dim=-1)
        return ((y, hidden) if return_hs else y), new_cache


def lean_decoder_steps(model: torch.nn.Module) -> int:
    """Give every ESPnet Transformer decoder under ``model`` whose layout :class:`LeanDecoderStep`
    covers the lean ``forward_one_step`` (in place; weights and state_dict unchanged; a decoder it
    does not cover is logged and left as it is). Returns how many decoders were changed."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, LeanDecoderStep) or not hasattr(module, "forward_one_step") \
                or not hasattr(module, "decoders"):
            continue
        why = unsupported_layout(module)
        if why:
            log.info("decoder %s keeps ESPnet's decoding step: %s", name or "(model)", why)
            continue
        module.__class__ = in_front(LeanDecoderStep, type(module))
        count += 1
    return count
