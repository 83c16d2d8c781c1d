"""The one place where espnet_compress plugs into ESPnet's task system.

ESPnet reads its choices (``encoder_choices``, ``model_choices``, ...) from ``ClassChoices`` objects
in ``espnet2.tasks.asr`` when it builds the argument parser, so adding entries right after that
module is imported (see :mod:`espnet_compress._import_hook`) makes our names valid in every stock
program: ``asr_train``, ``asr_inference``, ``pack``, ``Speech2Text`` and hence ``asr.sh``.

Later components add one line to the tables below; nothing else needs to know about ESPnet's
internals.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Dict, Optional

#: ``ClassChoices`` attribute of ``espnet2.tasks.asr`` -> {choice name: "module:Class"}
CHOICES: Dict[str, Dict[str, str]] = {
    "encoder_choices": {
        "elastic_conformer": "espnet_compress.encoders.elastic_conformer:ElasticConformerEncoder",
        "quantized_conformer": "espnet_compress.encoders.aliases:QuantizedConformerEncoder",
        "nested_conformer": "espnet_compress.encoders.aliases:NestedConformerEncoder",
        "foldable_conformer": "espnet_compress.encoders.aliases:FoldableConformerEncoder",
        "searchable_conformer": "espnet_compress.encoders.aliases:SearchableConformerEncoder",
        "elastic_wav2vec2": "espnet_compress.encoders.wav2vec2:ElasticWav2Vec2Encoder",
        "quantized_wav2vec2": "espnet_compress.encoders.aliases:QuantizedWav2Vec2Encoder",
        "nested_wav2vec2": "espnet_compress.encoders.aliases:NestedWav2Vec2Encoder",
        "foldable_wav2vec2": "espnet_compress.encoders.aliases:FoldableWav2Vec2Encoder",
    },
    "model_choices": {
        "compressed": "espnet_compress.models.compressed_asr:CompressedASRModel",
    },
}

_registered_into: Optional[int] = None


def _load(target: str) -> type:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def register(asr_task_module: Optional[ModuleType] = None) -> None:
    """Add this package's classes to ESPnet's ASR ``ClassChoices`` (idempotent).

    Called automatically by the import hook; call it yourself when the hook is disabled
    (``ESPNET_COMPRESS_NO_HOOK=1``) or the package is used from a source tree without installing.
    """
    global _registered_into
    if asr_task_module is None:
        asr_task_module = importlib.import_module("espnet2.tasks.asr")
    if _registered_into == id(asr_task_module):
        return
    for choices_name, entries in CHOICES.items():
        choices = getattr(asr_task_module, choices_name)
        for name, target in entries.items():
            choices.classes[name.lower()] = _load(target)
    _registered_into = id(asr_task_module)
    logging.getLogger(__name__).debug("espnet_compress registered into %s", asr_task_module.__name__)
