#!/usr/bin/env bash
# The one place that turns a slurm allocation into a torchrun command. srun starts this script
# once per node (the sbatch files ask for --ntasks-per-node=1); the torchrun agents on the nodes
# meet at the allocation's first node (c10d rendezvous) and each starts GPUS_PER_NODE ranks of
# train.py. Run it from the repository root:
#
#   srun --kill-on-bad-exit=1 bash scripts/slurm/launch.sh loss=sft model=llama3_8b ...
#
# From slurm:
#   SLURM_JOB_ID        rendezvous id. torchrun exports it to train.py as TORCHELASTIC_RUN_ID, from
#                       which the default run_dir runs/<exp_name>/<job id> is made: the same on
#                       every node, and the same again when the job is requeued (same job id).
#   SLURM_NNODES        number of torchrun agents to wait for.
#   SLURM_JOB_NODELIST  its first host runs the rendezvous store.
# Overridable:
#   MASTER_ADDR      rendezvous host (default: first host of SLURM_JOB_NODELIST, via scontrol)
#   MASTER_PORT      rendezvous port (default: 15000 + job id % 15000, so two jobs sharing a node
#                    do not collide; below Linux's ephemeral port range)
#   GPUS_PER_NODE    ranks per node (default: SLURM_GPUS_ON_NODE, else nvidia-smi's GPU count,
#                    else 1: on a CPU node one rank that uses all the node's cores)
#   PY               python with the project installed (default: .venv/bin/python, else python3)
#   SHUTDOWN_TIMEOUT seconds torchrun waits for ranks to exit after forwarding a signal, before
#                    SIGKILL (default 110: inside sbatch's --signal=USR1@120 warning)
#
# train.py gets `resume=true` first, so a requeued job continues from the last checkpoint in
# run_dir (and a first start, finding none, starts fresh); an explicit `resume=false` after it wins.
# slurm signals every process of the job step, torchrun and its ranks alike. torchrun forwards
# SIGTERM (scancel, requeue) and SIGINT to every rank by itself; --signals_to_handle makes it forward
# SIGUSR1 (slurm's warning before the time limit) too, where by default it would die of it (and its
# ranks with it, without a checkpoint: they end when torchrun ends). It then waits SHUTDOWN_TIMEOUT
# seconds for the ranks to checkpoint and exit. A rank takes the copy from slurm and the copy from
# torchrun as one request.
set -euo pipefail

die() { echo "launch.sh: $*" >&2; exit 2; }
[ -n "${SLURM_JOB_ID:-}" ] || die "SLURM_JOB_ID is not set: run me with srun inside a slurm job (see scripts/slurm/*.sbatch)"
[ -n "${SLURM_NNODES:-}" ] || die "SLURM_NNODES is not set: run me with srun inside a slurm job"
[ -f train.py ] || die "no train.py in $PWD: run from the repository root"

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [ -z "${MASTER_ADDR:-}" ]; then
    [ -n "${SLURM_JOB_NODELIST:-}" ] || die "SLURM_JOB_NODELIST is not set (or set MASTER_ADDR)"
    # awk, not head: it reads all of scontrol's output, so scontrol never dies of SIGPIPE (pipefail)
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
    [ -n "$MASTER_ADDR" ] || die "scontrol found no host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
fi
MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}

if [ -z "${GPUS_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [ "$n" -gt 0 ]; then
        GPUS_PER_NODE=$n
    else
        GPUS_PER_NODE=1
    fi
fi

echo "launch.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), node ${SLURM_NODEID:-?} of $SLURM_NNODES" \
     "on $(hostname): $GPUS_PER_NODE rank(s), rendezvous at $MASTER_ADDR:$MASTER_PORT" >&2

exec "$PY" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout "${SHUTDOWN_TIMEOUT:-110}" \
    train.py resume=true "$@"
