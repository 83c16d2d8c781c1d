#!/usr/bin/env bash
# LibriSpeech train-clean-100 Conformer: the fp32 baseline and its espnet_compress systems.
# Stock ESPnet asr.sh and ESPnet's own librispeech_100 data preparation (local/ is ESPnet's
# egs2/librispeech_100/asr1/local); our encoders/models come from the installed espnet_compress
# plugin. Install into an ESPnet checkout first (README.md: install_recipe.sh), then, from there:
#
#   ./run.sh                                 # fp32 baseline: data prep, BPE 5000, train, decode, score
#   ./run.sh --stage 11 --asr_config conf/train_asr_elastic_conformer.yaml       # elastic twin
#   ./run.sh --stage 11 --asr_config conf/train_asr_quantized_conformer_4bit.yaml \
#       --pretrained_model exp/asr_train_asr_conformer_raw_en_bpe5000_sp/valid.acc.ave.pth
#   (same with ..._8bit.yaml; --pretrained_model is asr.sh's --init_param: QAT starts from fp32)
#
# NOTE: the defaults below expect 1 GPU with 32 GB, as ESPnet's librispeech_100 Conformer.
set -e
set -u
set -o pipefail

train_set="train_clean_100"
valid_set="dev"             # dev_clean + dev_other, combined by ESPnet's local/data.sh
test_sets="test_clean test_other dev_clean dev_other"

asr_config=conf/train_asr_conformer.yaml
inference_config=conf/decode_asr.yaml

# speed perturbation (train_set becomes ${train_set}_sp inside asr.sh)
speed_perturb_factors="0.9 1.0 1.1"

# local/data.sh stage 4 only fetches the LibriSpeech LM text (openslr 11), unused without an LM.
./asr.sh \
    --lang en \
    --ngpu 1 \
    --nj 32 \
    --inference_nj 32 \
    --local_data_opts "--stop_stage 3" \
    --feats_type raw \
    --audio_format "flac.ark" \
    --max_wav_duration 30 \
    --token_type bpe \
    --nbpe 5000 \
    --bpe_train_text "data/${train_set}/text" \
    --use_lm false \
    --lm_train_text "data/${train_set}/text" \
    --asr_config "${asr_config}" \
    --inference_config "${inference_config}" \
    --train_set "${train_set}" \
    --valid_set "${valid_set}" \
    --test_sets "${test_sets}" \
    --speed_perturb_factors "${speed_perturb_factors}" "$@"
