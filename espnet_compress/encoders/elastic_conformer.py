"""``elastic_conformer``: ESPnet's Conformer whose forward follows an explicit execution plan.

This is the Conformer every compression method in the toolkit configures. Constructed with the
same options as ESPnet's ``conformer`` and the default plan it *is* that encoder: same parameter
names, same numbers, so existing ESPnet Conformer checkpoints load unchanged and can be compressed.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_compress.core.elastic import ElasticBlockStack, ElasticFeedForward
from espnet_compress.core.sharing import SharedComputation
from espnet_compress.encoders.elastic import ElasticEncoder, PlanLike, pop_features, with_feature_options
from espnet_compress.utils.signature import merge_signature, reject_unknown_options


@with_feature_options
@merge_signature(ConformerEncoder.__init__, skip=("self", "input_size"))
class ElasticConformerEncoder(ElasticEncoder, ConformerEncoder):
    """Conformer encoder executing an :class:`ExecutionPlan` (block order, FFN widths, bit widths).

    Args:
        input_size: input feature dimension (given by ESPnet).
        plan: the default plan, as a mapping (``blocks``, ``ffn_units``, ``bits``, and the keys of
            active features such as ``depth``) or a plan object; ``None`` runs every block once at
            full width, i.e. the stock Conformer.
        quant_conf, fold, ...: feature blocks (:mod:`espnet_compress.features`), off when absent.
        **conformer_kwargs: every option of ESPnet's ``ConformerEncoder`` (same names, same
            defaults; ``--print_config`` lists them).
    """

    FAMILY = "conformer"
    SHAPE_OPTIONS = ("num_blocks", "linear_units")
    STOCK_ENCODER = "conformer"

    def __init__(self, input_size: int, plan: PlanLike = None, **conformer_kwargs: Any) -> None:
        reject_unknown_options(type(self), conformer_kwargs, "encoder_conf")
        features = pop_features(conformer_kwargs)
        if conformer_kwargs.get("layer_drop_rate", 0.0):
            # ESPnet's ConformerEncoder accepts the option but its forward iterates the blocks
            # itself, so MultiSequential's layer drop never runs: a stock baseline would train
            # without it and this twin with it. Refuse instead of silently differing.
            raise ValueError(
                f"encoder_conf.layer_drop_rate: {conformer_kwargs['layer_drop_rate']} is not supported: ESPnet's "
                f"ConformerEncoder accepts it but never applies it, so the stock baseline would train without "
                f"layer drop; remove the option (or set 0.0) so both encoders compute the same"
            )
        super().__init__(input_size, **conformer_kwargs)
        opts = _conformer_defaults() | conformer_kwargs
        self._init_elastic(self.encoders, ElasticBlockStack, ElasticFeedForward, opts["linear_units"], plan, features)

    @contextlib.contextmanager
    def sharing(self, memo: SharedComputation) -> Iterator[SharedComputation]:
        """See :meth:`ElasticEncoder.sharing`. The stock ``ConformerEncoder.forward`` calls
        ``self.embed(...)`` directly, so the input layer is routed through the memo by an
        instance-level ``forward`` that exists only inside this context."""
        embed = self.embed
        original = embed.forward
        embed.forward = lambda *args: self._shared_input((embed,), original, *args)
        try:
            with super().sharing(memo):
                yield memo
        finally:
            del embed.forward


def _conformer_defaults() -> dict:
    return {
        k: p.default
        for k, p in inspect.signature(ConformerEncoder.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
