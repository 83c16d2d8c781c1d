# How asr.sh runs its jobs (ESPnet's egs2/TEMPLATE/asr1/cmd.sh has the full documentation).
#   train_cmd: data preparation, feature and statistics jobs (CPU)
#   cuda_cmd:  training and GPU decoding ("--gpu N" is added by asr.sh)
#   decode_cmd: CPU decoding
# Pick the back-end here. "slurm" and "sge" read conf/slurm.conf / conf/queue.conf: copy ESPnet's
# examples (egs2/TEMPLATE/asr1/conf/) into this recipe's conf/ and set your partitions or queues.
cmd_backend=local

if [ "${cmd_backend}" = local ]; then      # this machine, no scheduler
    export train_cmd="run.pl"
    export cuda_cmd="run.pl"
    export decode_cmd="run.pl"
elif [ "${cmd_backend}" = stdout ]; then   # this machine, logs also on stdout
    export train_cmd="stdout.pl"
    export cuda_cmd="stdout.pl"
    export decode_cmd="stdout.pl"
elif [ "${cmd_backend}" = slurm ]; then    # sbatch; "--gpu N" becomes "--gres gpu:N"
    export train_cmd="slurm.pl"
    export cuda_cmd="slurm.pl"
    export decode_cmd="slurm.pl"
elif [ "${cmd_backend}" = sge ]; then      # qsub (SGE, Torque, PBS, ...)
    export train_cmd="queue.pl"
    export cuda_cmd="queue.pl"
    export decode_cmd="queue.pl"
else
    echo "$0: Error: Unknown cmd_backend=${cmd_backend}" 1>&2
    return 1
fi
