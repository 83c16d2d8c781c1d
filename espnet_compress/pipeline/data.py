"""Which corpus a run trains on: the synthetic spoken_commands corpus, or the user's own data dir.

The main job and the training benchmarks take ``--data_dir``: any Kaldi-style corpus with
``train``/``dev``/``test`` subsets (``wav.scp``, ``text``, ``utt2spk``). It is validated completely,
including every audio header against the sample rate the training configs expect, *before* any
stage writes anything: a bad corpus otherwise surfaces as a crash in the data loader minutes into a
training, or as a model trained on audio at the wrong rate.

An output dir is bound to the corpus it was made from (``data_source.json``): its token list and
feature statistics belong to that corpus, so reusing the dir with another corpus is refused, and a
benchmark pointed at the main job's output dir finds the user's corpus without being told again.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import yaml

from espnet_compress.corpus.kaldi_dir import SampleRate, validate_corpus_dir
from espnet_compress.utils.io import atomic_write_text

#: written into an output dir made from a user's corpus: ``{"data_dir": <absolute path>}``
DATA_SOURCE = "data_source.json"
#: ESPnet's ``DefaultFrontend`` default, used when a config sets no ``frontend_conf.fs``
DEFAULT_FS = 16000
#: where an output dir keeps the synthetic corpus it generated
SYNTHETIC_DATA = "data"


@dataclasses.dataclass(frozen=True)
class UserCorpus:
    """A validated user corpus: where it is, its size per subset, and the rate it was checked at."""

    path: Path
    counts: Dict[str, int]
    sample_rate: SampleRate


def frontend_sample_rate(config: Path) -> SampleRate:
    """The sample rate a training config's front end assumes (``frontend_conf.fs``).

    ESPnet accepts ``16000`` or a size string such as ``16k`` (parsed with humanfriendly, as its
    front ends do); absent means the default front end's 16 kHz.
    """
    conf = yaml.safe_load(Path(config).read_text()) or {}
    source = f"frontend_conf.fs in {config}"
    value = (conf.get("frontend_conf") or {}).get("fs", DEFAULT_FS)
    if isinstance(value, str):
        import humanfriendly

        try:
            value = humanfriendly.parse_size(value)
        except humanfriendly.InvalidSize:
            raise ValueError(f"{source}: {value!r} is not a sample rate (e.g. 16000 or 16k)") from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: {value!r} is not a sample rate (e.g. 16000 or 16k)")
    return SampleRate(value, source)


def common_sample_rate(configs: Sequence[Path]) -> SampleRate:
    """The one rate every training config of a run expects (they decode the same test audio)."""
    rates = [frontend_sample_rate(c) for c in configs]
    for rate in rates[1:]:
        if rate.hz != rates[0].hz:
            raise ValueError(f"{rates[0].source} is {rates[0].hz} Hz but {rate.source} is {rate.hz} Hz; "
                             f"the systems of one run must read the same audio")
    return rates[0]


def resolve_corpus(out_dir: Path, data_dir: Optional[Path], train_configs: Sequence[Path]) -> Optional[UserCorpus]:
    """Validate and bind the user's corpus for ``out_dir``; None means 'make the synthetic corpus'.

    ``data_dir`` None reuses the corpus ``out_dir`` was bound to earlier (validated again: files
    may have changed since). Raises ``DataDirError`` (corpus) or ``ValueError`` (configs, or
    an ``out_dir`` made from another corpus) before writing anything; the binding is written only
    once everything checked out.
    """
    out_dir = Path(out_dir).resolve()
    bound = _bound_corpus(out_dir)
    if data_dir is None and bound is None:
        return None
    path = Path(data_dir).resolve() if data_dir is not None else bound
    if bound is not None and bound != path:
        raise ValueError(f"{out_dir} was made from the corpus {bound} (see {out_dir / DATA_SOURCE}); its token list "
                         f"and feature statistics do not fit {path}: use another output dir")
    if bound is None and (out_dir / SYNTHETIC_DATA).exists():
        raise ValueError(f"{out_dir} already holds the synthetic corpus ({out_dir / SYNTHETIC_DATA}) with its token "
                         f"list and feature statistics; use another output dir for {path}")
    rate = common_sample_rate(train_configs)
    counts = validate_corpus_dir(path, rate)
    if bound is None:
        atomic_write_text(out_dir / DATA_SOURCE, json.dumps({"data_dir": str(path)}, indent=2) + "\n")
    return UserCorpus(path, counts, rate)


def corpus_of(out_dir: Path) -> Path:
    """The data dir an output dir's models were trained on: the user's corpus it is bound to, else
    the synthetic corpus it made. The benchmarks that start from a finished main job read it here,
    so a main job made either way serves them."""
    out_dir = Path(out_dir)
    bound = _bound_corpus(out_dir)
    if bound is not None:
        return bound
    if (out_dir / SYNTHETIC_DATA).is_dir():
        return (out_dir / SYNTHETIC_DATA).resolve()
    raise ValueError(f"{out_dir} holds no corpus: neither {DATA_SOURCE} (a --data_dir run) nor {SYNTHETIC_DATA}/ "
                     f"(the synthetic corpus); is it a finished main job's output dir?")


def _bound_corpus(out_dir: Path) -> Optional[Path]:
    """The corpus ``out_dir`` was made from, if it was made from a user's corpus."""
    source = out_dir / DATA_SOURCE
    if not source.is_file():
        return None
    try:
        return Path(json.loads(source.read_text())["data_dir"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{source}: unreadable ({err!r}); remove it only if {out_dir} holds no training") from None
