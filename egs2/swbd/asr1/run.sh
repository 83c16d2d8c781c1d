#!/usr/bin/env bash
# Switchboard-300h (LDC97S62) Conformer: the fp32 baseline and its espnet_compress systems.
# Stock ESPnet asr.sh and ESPnet's own swbd data preparation and Hub5'00 scoring (local/ is
# ESPnet's egs2/swbd/asr1/local); our encoders/models come from the installed espnet_compress
# plugin. Install into an ESPnet checkout first (README.md: install_recipe.sh), then, from there:
#
#   ./run.sh                                 # fp32 baseline: data prep, BPE 2000, train, decode, score
#   ./run.sh --stage 11 --asr_config conf/train_asr_elastic_conformer.yaml       # elastic twin
#   ./run.sh --stage 11 --asr_config conf/train_asr_quantized_conformer_4bit.yaml \
#       --pretrained_model exp/asr_train_asr_conformer_raw_en_bpe2000_sp/valid.acc.ave.pth
#   (same with ..._8bit.yaml; --pretrained_model is asr.sh's --init_param: QAT starts from fp32)
#
# NOTE: the defaults below expect 2 GPUs with 48 GB each, as ESPnet's swbd Conformer.
set -e
set -u
set -o pipefail

train_set=train_nodup       # ~286 h after ESPnet's 4000-utterance train_dev split and de-duplication
valid_set=train_dev
test_sets="eval2000"        # Hub5'00 (Switchboard + CallHome); RT03: see README.md

asr_config=conf/train_asr_conformer.yaml
inference_config=conf/decode_asr.yaml  # keep the "decode_" prefix: local/score.sh globs decode_*

# speed perturbation (train_set becomes ${train_set}_sp inside asr.sh)
speed_perturb_factors="0.9 1.0 1.1"

./asr.sh \
    --lang en \
    --ngpu 2 \
    --nj 32 \
    --gpu_inference true \
    --inference_nj 2 \
    --feats_type raw \
    --audio_format "flac.ark" \
    --token_type bpe \
    --nbpe 2000 \
    --bpe_train_text "data/${train_set}/text" \
    --use_lm false \
    --lm_train_text "data/${train_set}/text" \
    --score_opts "-s" \
    --asr_config "${asr_config}" \
    --inference_config "${inference_config}" \
    --train_set "${train_set}" \
    --valid_set "${valid_set}" \
    --test_sets "${test_sets}" \
    --speed_perturb_factors "${speed_perturb_factors}" "$@"
