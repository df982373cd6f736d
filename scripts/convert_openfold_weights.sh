#!/usr/bin/env bash
# Convert OpenFold (PyTorch) weights to a ferrofold safetensors file, checking every name and shape
# against the model of the given configuration (OpenFold's state-dict names are ferrofold's, so this
# is a format conversion; `model.`/`module.` wrapper prefixes are removed, floats become f32).
#
#   scripts/convert_openfold_weights.sh FROM.pt OUT.safetensors [--key state_dict] [--config FILE ...] [--set K=V ...]
#
# With no --config, the AF2 model of configs/base.toml is used. Then fine-tune with
#   ferrofold train --init-from OUT.safetensors ...
# AlphaFold2 JAX parameters (.npz) are not supported (convert them to an OpenFold state dict first).
# FERROFOLD (default: target/release/ferrofold, built if missing) names the binary.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
from=$1
out=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${FERROFOLD:-$repo/target/release/ferrofold}
if [ ! -x "$bin" ]; then
  (cd "$repo" && cargo build --release --bin ferrofold)
fi
has_config=0
for a in "$@"; do
  [ "$a" = "--config" ] && has_config=1
done
extra=()
[ $has_config = 1 ] || extra=(--config "$repo/configs/base.toml")
exec "$bin" convert-weights --from "$from" --out "$out" "${extra[@]}" "$@"
