#!/usr/bin/env bash
# spoken_commands: a tiny synthetic corpus (espeak-ng + sox) to train and compress ASR on a CPU.
# Run inside an ESPnet checkout (see README.md): stock asr.sh, our encoders from the installed plugin.
set -e
set -u
set -o pipefail

train_set=train
valid_set=dev
test_sets="test"

asr_config=conf/train_asr_elastic_conformer_tiny.yaml
inference_config=conf/decode_asr.yaml

./asr.sh \
    --lang en \
    --ngpu 0 \
    --nj 2 \
    --inference_nj 2 \
    --gpu_inference false \
    --audio_format wav \
    --feats_type raw \
    --token_type word \
    --use_lm false \
    --max_wav_duration 30 \
    --asr_config "${asr_config}" \
    --inference_config "${inference_config}" \
    --inference_asr_model valid.acc.best.pth \
    --train_set "${train_set}" \
    --valid_set "${valid_set}" \
    --test_sets "${test_sets}" \
    --lm_train_text "data/${train_set}/text" "$@"
