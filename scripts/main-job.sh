#!/usr/bin/env bash
# The main job on a fresh machine: setup, release build, then a small real training run of the tiny
# AF2 model on the 31 sample training proteins, data-parallel over 2 MPI ranks on the CPU, ending
# with an evaluation summary on the 5 validation chains (lDDT-Cα, GDT-TS/HA, RMSD, dRMSD, pLDDT),
# predicted PDB files and PNG curves. A few minutes on 2 cores.
#   RUN_DIR=runs/x STEPS=300 scripts/main-job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release
export FERROFOLD_DATA=${FERROFOLD_DATA:-$PWD/../shared/data/proteins}
RUN_DIR=${RUN_DIR:-runs/main-job}
STEPS=${STEPS:-150}
mpirun --oversubscribe -np 2 target/release/ferrofold info --check \
  --config configs/base.toml --config configs/tiny.toml
mpirun --oversubscribe -np 2 target/release/ferrofold train \
  --config configs/base.toml --config configs/tiny.toml \
  --set train.max_steps="$STEPS" --set train.eval_every=50 --set train.checkpoint_every=50 \
  --run-dir "$RUN_DIR"
target/release/ferrofold plot "$RUN_DIR"
echo "run dir: $RUN_DIR (metrics.jsonl, checkpoints, eval/step-*/<chain>.pdb, *.png)"
