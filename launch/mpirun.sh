#!/usr/bin/env bash
# Open MPI: NP processes (one per GPU); rank 0 sends its address and a free port to the others over
# MPI (mpi4py: pip install mpi4py). Several nodes: HOSTFILE in Open MPI's format (`host slots=8`).
# Extra arguments go to `modalmoe train`. Open MPI starts the other nodes' processes over ssh with PATH
# exported (-x PATH; add `-x NAME` to args for more). tests/test_multinode.py runs it with a two-node HOSTFILE.
#   NP=8 bash launch/mpirun.sh --config launch/configs/small.yaml --set parallel.ep=8
#   NP=16 HOSTFILE=hosts bash launch/mpirun.sh --config ... --set parallel.tp=8
set -euo pipefail
args=(-np "${NP:-2}" --bind-to none -x PATH)
if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE"); fi
if [ "$(id -u)" = 0 ]; then args+=(--allow-run-as-root); fi
exec mpirun "${args[@]}" "${PYTHON:-python}" -m modalmoe.launch.train "$@"
