"""The synthetic "spoken_commands" corpus and Kaldi data-dir helpers.

Kept separate from training code so that data can be rebuilt and checked
(``python -m espnet_compress.bin.make_corpus`` / ``validate_data``) without
importing torch or ESPnet.
"""
from espnet_compress.corpus.kaldi_dir import (
    CORPUS_SUBSETS,
    DataDirError,
    SampleRate,
    validate_corpus_dir,
    validate_data_dir,
    write_kaldi_dir,
)
from espnet_compress.corpus.spoken_commands import (
    VOCABULARY,
    SplitReport,
    UtteranceSpec,
    Voice,
    add_noise,
    generate_corpus,
    plan_split,
    render_utterance,
    split_voices,
)

__all__ = [
    "CORPUS_SUBSETS",
    "VOCABULARY",
    "DataDirError",
    "SampleRate",
    "SplitReport",
    "UtteranceSpec",
    "Voice",
    "add_noise",
    "generate_corpus",
    "plan_split",
    "render_utterance",
    "split_voices",
    "validate_corpus_dir",
    "validate_data_dir",
    "write_kaldi_dir",
]
