"""Data for pipelined DARTS (``encoder_conf.search``): a held-out split of the training set.

Stage 1 trains the supernet's weights on ``train_sub``; stage 2 trains only the architecture weights
on ``train_heldout``, utterances the weights never saw (the paper's "separate held-out data"); the
dev set stays the validation set of both and the test set is never touched. Both splits get the
shape files ``asr_train`` batches with (the training set's, filtered) and the full training set's
feature statistics, so every stage and the derived model's fine-tuning normalise identically.

The held-out dir carries ``held_out.json`` (:data:`~espnet_compress.features.search.HELD_OUT_MARKER`),
which a stage-2 run checks (``encoder_conf.search.held_out``).
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Dict, List, Set

from espnet_compress.corpus.kaldi_dir import validate_data_dir, write_kaldi_dir
from espnet_compress.features.search import HELD_OUT_MARKER
from espnet_compress.utils.io import atomic_write_text

#: per-utterance files of an ``asr_stats/<split>`` dir that are filtered to a subset
STATS_TABLES = ("speech_shape", "text_shape", "text_shape.word")


@dataclasses.dataclass(frozen=True)
class SearchSplit:
    """Where :func:`split_held_out` put the two subsets (Kaldi dirs under ``out_dir``) and their
    ``asr_stats`` dirs."""

    out_dir: Path
    train_sub: str
    held_out: str
    num_sub: int
    num_held_out: int

    @property
    def held_out_dir(self) -> Path:
        return self.out_dir / self.held_out

    def stats_dir(self, name: str) -> Path:
        """The ``asr_stats`` dir of subset ``name`` (train/ = the subset, valid/ = the dev set's)."""
        return self.out_dir / f"asr_stats_{name}"


def _table(path: Path) -> Dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, _, value = line.partition(" ")
            out[key] = value
    return out


def split_held_out(train_dir: Path, out_dir: Path, stats_dir: Path, fraction: float = 0.1, seed: int = 0,
                   valid_stats: str = "valid", train_sub: str = "train_sub",
                   held_out: str = "train_heldout") -> SearchSplit:
    """Split the Kaldi dir ``train_dir`` into ``out_dir/<train_sub>`` and ``out_dir/<held_out>`` (a
    ``fraction`` of the utterances drawn with ``seed``), each with an ``asr_stats`` dir filtered from
    ``stats_dir`` (the full training set's: ``train/`` shapes and statistics, ``<valid_stats>/``).
    Reuses a split made with the same settings; a different one is an error."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    train_dir, out_dir, stats_dir = Path(train_dir), Path(out_dir), Path(stats_dir)
    validate_data_dir(train_dir)
    result = SearchSplit(out_dir, train_sub, held_out, 0, 0)
    marker = result.held_out_dir / HELD_OUT_MARKER
    settings = {"source": str(train_dir.resolve()), "fraction": fraction, "seed": seed, "complement": train_sub}
    if marker.is_file():
        have = json.loads(marker.read_text())
        if {k: have.get(k) for k in settings} != settings:
            raise ValueError(f"{marker} was made with {have}, this run asks for {settings}; remove "
                             f"{out_dir} to split again")
    else:
        wav, text, utt2spk = (_table(train_dir / f) for f in ("wav.scp", "text", "utt2spk"))
        utts = sorted(wav)
        if len(utts) < 2:
            raise ValueError(f"{train_dir}: {len(utts)} utterance(s); a held-out split needs at least 2")
        n_held = min(len(utts) - 1, max(1, round(fraction * len(utts))))
        held = set(random.Random(seed).sample(utts, n_held))
        for name, keep in ((train_sub, [u for u in utts if u not in held]), (held_out, sorted(held))):
            write_kaldi_dir(out_dir / name, [(u, utt2spk[u], wav[u], text[u]) for u in keep])
            _subset_stats(stats_dir, result.stats_dir(name), set(keep), valid_stats)
        atomic_write_text(marker, json.dumps({**settings, "num_utterances": n_held}, indent=2) + "\n")
    count = lambda name: sum(1 for ln in (out_dir / name / "text").read_text().splitlines() if ln.strip())  # noqa: E731
    return dataclasses.replace(result, num_sub=count(train_sub), num_held_out=count(held_out))


def _subset_stats(stats_dir: Path, out: Path, keep: Set[str], valid_stats: str) -> None:
    """``out/train``: the training set's shape files for ``keep`` and its feature statistics;
    ``out/<valid_stats>``: a copy of the validation set's."""
    src = stats_dir / "train"
    if not (src / "feats_stats.npz").is_file():
        raise ValueError(f"{src}: no feature statistics; collect them on the full training set first")
    (out / "train").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "feats_stats.npz", out / "train" / "feats_stats.npz")
    for name in STATS_TABLES:
        if (src / name).is_file():
            lines: List[str] = [ln for ln in (src / name).read_text().splitlines()
                                if ln.strip() and ln.split(maxsplit=1)[0] in keep]
            atomic_write_text(out / "train" / name, "".join(f"{ln}\n" for ln in lines))
    if (stats_dir / valid_stats).is_dir():
        shutil.copytree(stats_dir / valid_stats, out / valid_stats, dirs_exist_ok=True)
