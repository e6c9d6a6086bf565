#!/bin/bash
# One mountd per node under Slurm: one task per node, each wrapping its
# training process in `mountd run`. SLURM_PROCID (0..N-1) is the node rank,
# so {node_rank} in the manifest gives each node its own output path.
#   sbatch configs/cluster/slurm-train.sh
#SBATCH --job-name=exp42
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@900     # SIGTERM 15 minutes before the time limit: time to upload
set -euo pipefail
export MOUNTD_WORKSPACE=/etc/mountd/workspace.yaml
# Slurm's SIGTERM reaches each mountd, which passes it to its training
# process, then uploads that node's outputs.
srun --kill-on-bad-exit=1 mountd run configs/container/manifest.yaml -- python train.py \
    --images '$AZUREML_DATAREFERENCE_images' --out '$AZUREML_DATAREFERENCE_outputs'
