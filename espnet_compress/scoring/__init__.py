"""Scoring of decoded test sets: sclite WER, MAPSSWE significance vs a baseline, comparison tables.

Only the standard library is imported here (torch is loaded lazily to count parameters), so the
scoring tools run in any Python that can see the ``sctk`` binaries.
"""
from espnet_compress.scoring.compare import (
    ComparisonTable,
    SystemRow,
    SystemSpec,
    compare,
)
from espnet_compress.scoring.sclite import ScoringInputError, WerResult, score
from espnet_compress.scoring.significance import (
    MatchedPairs,
    SignificanceResult,
    mapsswe,
)

__all__ = [
    "ComparisonTable",
    "MatchedPairs",
    "ScoringInputError",
    "SignificanceResult",
    "SystemRow",
    "SystemSpec",
    "WerResult",
    "compare",
    "mapsswe",
    "score",
]
