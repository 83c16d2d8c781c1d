# Local CPU jobs (see egs2/TEMPLATE/asr1/cmd.sh in ESPnet for queue back-ends).
export train_cmd="run.pl"
export cuda_cmd="run.pl"
export decode_cmd="run.pl"
