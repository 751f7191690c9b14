#!/usr/bin/env bash
# The first run on any machine (CPU or one GPU, a few minutes): the smoke preset on the embedded demo
# data set, in one process. If this trains and prints the evaluation, the install is sound; then try
# deepspeed.sh, mpirun.sh or slurm/train.sbatch.
#   bash launch/smoke.sh                                   # runs/smoke/
#   bash launch/smoke.sh --set train.steps=50 train.device=cuda
set -euo pipefail
exec "${PYTHON:-python}" -m modalmoe.launch.train --preset smoke "$@"
