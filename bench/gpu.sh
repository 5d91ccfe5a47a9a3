#!/usr/bin/env bash
# One prepared single-GPU run (an H200 lent for minutes): bottle at 256², bf16.
#
#   bash bench/gpu.sh [--dry-run] [extra bench/gpu_run.py flags]
#   bash bench/gpu.sh --plan=paper_protocol [--dry-run] [extra bench/paper_protocol.py flags]
#
# Installs the wheels carried in .whl/ (the machine is offline). The default plan trains the
# paper-scale model for a fixed number of steps, evaluates ESM and ESM^σ and prints one table
# (bench/gpu_run.py); --plan=paper_protocol trains configs/gpu/paper_protocol.py for its epochs and
# evaluates ESM, ESM^σ, the SGM sampler and the z-score baseline (bench/paper_protocol.py). Data: .gpu_data/mvtec_ad/bottle
# (a copy of ../shared/data/mvtec_ad/bottle carried with the run) or $GPU_DATA_ROOT. The table and
# gpu_results.json go to $OUT (default /tmp/esm_gpu); checkpoints to $ESM_GPU_WORKDIR. --dry-run runs
# the same code path with a tiny config on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
dry=0
script=bench/gpu_run.py
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    --plan=paper_protocol) script=bench/paper_protocol.py ;;
    --plan=*) echo "unknown plan ${a#--plan=} (expected paper_protocol)" >&2; exit 2 ;;
    *) args+=("$a") ;;
  esac
done
# Only where the packages are missing: the carried wheels are built for the device's Python.
if ! python3 -c 'import ml_collections, grain, tensorflow_datasets, array_record' 2>/dev/null &&
    compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/esm_site .whl/*.whl
  export PYTHONPATH=/tmp/esm_site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-/tmp/esm_gpu}
work=${ESM_GPU_WORKDIR:-/tmp/esm_gpu_work}  # checkpoints stay out of $OUT (gigabytes)
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
if (( dry )); then
  JAX_PLATFORMS=cpu python3 "$script" --dry_run --workdir="$work" --out="$out" "${args[@]}"
else
  python3 "$script" --data_root="${GPU_DATA_ROOT:-.gpu_data}" --workdir="$work" --out="$out" \
    "${args[@]}"
fi
