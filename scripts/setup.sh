#!/usr/bin/env bash
# Installs what ferrofold needs on a fresh Debian/Ubuntu machine (idempotent; the Rust toolchain is
# assumed, rust-toolchain.toml pins it): Open MPI + libclang (rsmpi), HDF5 (hdf5-metno), pkg-config,
# a TrueType font for `ferrofold plot`,
# and cargo-nextest (tests run one process per test, because MPI initialises once per process).
#   FERROFOLD_WITH_SLURM=1 scripts/setup.sh   also installs Slurm + munge (launcher tests)
set -euo pipefail

need=(libopenmpi-dev openmpi-bin libclang-dev libhdf5-dev pkg-config fonts-dejavu-core)
if [ "${FERROFOLD_WITH_SLURM:-0}" = 1 ]; then
  need+=(slurmd slurmctld slurm-client munge)
fi
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

# Open MPI refuses to run as root unless told; CI containers run as root.
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
echo "setup: ok ($(mpirun --version 2>/dev/null | head -1))"
