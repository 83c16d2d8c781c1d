"""The hooks a feature of the elastic encoder implements (all optional)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import torch

from espnet_compress.core.plan import ExecutionPlan

if TYPE_CHECKING:  # the encoder imports the features, not the other way round
    from espnet_compress.encoders.elastic import ElasticEncoder


class EncoderFeature:
    """One ``encoder_conf`` block (``KEY``) switched on for an elastic encoder.

    Hooks, in the order the encoder calls them:

    * ``__init__(conf, where)``: validate the YAML block (``where`` is its YAML path for messages);
    * :meth:`attach`: after the host network is built and made elastic (e.g. add quantizers);
    * :meth:`default_plan`: complete the user's default plan (e.g. the default bits, the depth);
    * :meth:`resolve`: turn the feature's own plan keys (``PLAN_KEYS``) into plan fields;
    * :meth:`check`: reject a resolved plan that breaks the feature's rule (message names it);
    * :meth:`loss_terms`: after each forward of the model, a term to add to the loss and stats to log
      (e.g. the search's complexity penalty).
    """

    KEY: str
    #: keys a plan or system spec may use that this feature turns into plan fields
    PLAN_KEYS: Tuple[str, ...] = ()

    def __init__(self, conf: Optional[Mapping[str, Any]], where: str) -> None:
        self.conf = dict(conf or {})
        self.where = where

    def attach(self, encoder: "ElasticEncoder") -> None:
        """Add what the feature needs to the built encoder."""

    def default_plan(self, encoder: "ElasticEncoder", plan: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """The default plan given the user's ``plan`` option (``None`` = not given)."""
        return plan

    def resolve(self, encoder: "ElasticEncoder", conf: Dict[str, Any], name: str) -> Dict[str, Any]:
        """Replace this feature's ``PLAN_KEYS`` in a plan mapping by plan fields."""
        return conf

    def check(self, encoder: "ElasticEncoder", plan: ExecutionPlan) -> None:
        """Raise :class:`~espnet_compress.core.plan.PlanError` for a plan the feature forbids."""

    def loss_terms(self, encoder: "ElasticEncoder", model: torch.nn.Module) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
        """(term added to the training loss or ``None``, stats for ESPnet's reporter) after a forward
        of ``model`` (the ESPnet model holding ``encoder``)."""
        return None, {}
