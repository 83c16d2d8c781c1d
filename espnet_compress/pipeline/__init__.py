"""Run ESPnet's stock programs in asr.sh's order, without asr.sh (which is not on PyPI)."""
from espnet_compress.pipeline.stages import AsrExperiment, Stage, StageError

__all__ = ["AsrExperiment", "Stage", "StageError"]
