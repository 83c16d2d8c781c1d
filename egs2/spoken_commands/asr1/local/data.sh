#!/usr/bin/env bash
# Stage 1 of asr.sh: synthesise the corpus into data/{train,dev,test} (Kaldi format, 16 kHz wav).
# Deterministic from --seed; test voices never occur in training. Needs espeak-ng and sox.
set -e
set -u
set -o pipefail

seed=0
num_train=2000
num_dev=150
num_test=300
nj=2

. utils/parse_options.sh || exit 1

python3 -m espnet_compress.bin.make_corpus --out_dir data --seed "${seed}" \
    --num_train "${num_train}" --num_dev "${num_dev}" --num_test "${num_test}" --nj "${nj}"
python3 -m espnet_compress.bin.validate_data data/train data/dev data/test
