#!/usr/bin/env bash
# The whole test suite, as CI runs it: setup, format check, clippy (warnings are errors), then every
# test with cargo-nextest (release profile: the float-heavy tests need optimised code; one build of the
# dependency stack serves binary, tests and benches). Multi-rank tests spawn `mpirun -np 2` themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

# Tests read the shared data and golden fixtures beside the checkout unless told otherwise.
export FERROFOLD_DATA=${FERROFOLD_DATA:-$PWD/../shared/data/proteins}
export FERROFOLD_GOLDEN_DIR=${FERROFOLD_GOLDEN_DIR:-$PWD/../shared/golden/openfold}
export OMPI_MCA_rmaps_base_oversubscribe=1

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets -- -D warnings
echo "== cargo nextest"
cargo nextest run --release --no-fail-fast "$@"
