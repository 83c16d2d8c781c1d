"""Decode-time cache of the source attention's keys and values (one projection per utterance).

ESPnet's Transformer decoder recomputes, at every output token and in every layer, the key and
value projections of the whole encoder output (``src_attn(x, memory, memory, mask)``), although the
encoder output does not change while an utterance is decoded. For one token of a 10 s utterance
(249 frames, d 256, 6 layers) those projections are 2 x 6 GEMMs of 249 x 256 x 256, about 95% of the
decoder's multiply-adds. :func:`cache_source_attention` makes each source attention keep the
projections of the last encoder output it saw and reuse them while that same tensor comes back
(beam search passes it expanded over the beams: a zero-stride view of the same storage).

The cached result is what recomputing gives: the same layers on the same input, once instead of
once per token; bit for bit with one hypothesis, and up to float rounding with several beams (the
projection then runs on one row block instead of one per beam, as ESPnet's own ``expand_kv``
does). Nothing is cached in training or with autograd on.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from espnet.nets.pytorch_backend.transformer.attention import MultiHeadedAttention


def _version(t: torch.Tensor) -> Optional[int]:
    """In-place writes seen so far; None for inference-mode tensors, which keep no count."""
    return None if t.is_inference() else t._version


def _same_source(cached: torch.Tensor, version: Optional[int], key: torch.Tensor) -> bool:
    """``key`` views the tensor ``cached`` was sliced from, not written in place since (views share
    one version counter, so ``version`` is the count when the entry was made; an inference-mode
    encoder output has none, and ESPnet's search never writes into it). The cache holds
    ``cached``, so its storage cannot be freed and handed to a new encoder output meanwhile."""
    return (cached.untyped_storage().data_ptr() == key.untyped_storage().data_ptr()
            and cached.storage_offset() == key.storage_offset() and cached.shape[1:] == key.shape[1:]
            and cached.stride()[1:] == key.stride()[1:] and _version(key) == version)


class CachedSourceAttention(MultiHeadedAttention):
    """ESPnet's ``MultiHeadedAttention`` whose key/value projections of one source are computed once.

    Applies when the batch shares one source (batch 1, or beams expanded from one utterance with
    a zero batch stride) and key is value (source attention); anything else computes as ESPnet does.
    """

    _source_cache: Optional[Tuple[torch.Tensor, Optional[int], torch.Tensor, torch.Tensor]]

    def source_keys_values(self, key: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Key and value projections of ``key``'s one source, (1, heads, frames, d_k), computed at
        its first use and reused while it comes back; None where the cache does not apply
        (training, autograd, or a batch of different sources)."""
        shared = key.size(0) == 1 or key.stride(0) == 0
        if self.training or torch.is_grad_enabled() or not shared:
            return None
        entry = getattr(self, "_source_cache", None)
        if entry is None or not _same_source(entry[0], entry[1], key):
            source = key[:1]
            k = self.k_norm(self.linear_k(source).view(1, -1, self.h, self.d_k).transpose(1, 2))
            v = self.linear_v(source).view(1, -1, self.h, self.d_k).transpose(1, 2)
            entry = self._source_cache = (source, _version(key), k, v)
        return entry[2], entry[3]

    def forward_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, expand_kv: bool = False):
        cached = self.source_keys_values(key) if key is value else None
        if cached is None:
            return super().forward_qkv(query, key, value, expand_kv)
        n_batch = query.size(0)
        q = self.q_norm(self.linear_q(query).view(n_batch, -1, self.h, self.d_k).transpose(1, 2))
        k, v = cached
        return q, k.expand(n_batch, -1, -1, -1), v.expand(n_batch, -1, -1, -1)


def cache_source_attention(model: torch.nn.Module) -> int:
    """Turn every decoder layer's ESPnet source attention under ``model`` into
    :class:`CachedSourceAttention` (in place; weights and state_dict unchanged). Returns how many."""
    count = 0
    for module in model.modules():
        attention = getattr(module, "src_attn", None)
        if type(attention) is MultiHeadedAttention:
            attention.__class__ = CachedSourceAttention
            count += 1
    return count
