#!/usr/bin/env bash
# The deepspeed launcher: one process per GPU on this node, or on every node of a hostfile (reached by
# passwordless ssh; see hostfile.example). Extra arguments go to `modalmoe train`.
#   NUM_GPUS=8 bash launch/deepspeed.sh --config launch/configs/small.yaml --set parallel.ep=8
#   HOSTFILE=launch/hostfile NUM_NODES=2 NUM_GPUS=8 bash launch/deepspeed.sh --config ... --set parallel.tp=8
# On a machine without GPUs the launcher starts NUM_GPUS CPU processes (gloo). With a hostfile, rank 0's
# address is the first node's `hostname -I` (over ssh), and the ranks see this shell's variables only
# for PYTHON*, NCCL* and a few more: others go in .deepspeed_env (here or in ~; see hostfile.example).
# tests/test_multinode.py runs it with a hostfile across two nodes.
set -euo pipefail
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
[ "${NUM_GPUS:-0}" -gt 0 ] || NUM_GPUS=1
args=(--num_gpus "$NUM_GPUS")
if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE" --num_nodes "${NUM_NODES:-1}"); fi
if [ -n "${MASTER_PORT:-}" ]; then args+=(--master_port "$MASTER_PORT"); fi
exec deepspeed "${args[@]}" --module modalmoe.launch.train "$@"
