#!/usr/bin/env bash
# The main job on a fresh machine: setup, release build, then a 2-rank run under mpirun.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release
export FERROFOLD_DATA=${FERROFOLD_DATA:-$PWD/../shared/data/proteins}
mpirun --oversubscribe -np 2 target/release/ferrofold info --check \
  --config configs/base.toml --config configs/tiny.toml
