#!/usr/bin/env bash
# What bench/gpu.sh needs on the offline GPU machine, put in this checkout (both folders are
# ignored by git and travel with the device call's `carry`):
#   .whl/       wheels for the device's Python 3.12 of the packages its image lacks, or has at other
#               versions, pinned as in requirements.txt (pip download, no dependencies resolved);
#   .gpu_data/  mvtec_ad/bottle copied from the shared data (22 MB of 256² PNGs).
#
#   bash bench/gpu_prepare.sh [SHARED_DATA_DIR]   # default ../shared/data
#
# Then, in one device call: command `bash bench/gpu.sh --plan=paper_protocol`, carry
# [".whl", ".gpu_data"], timeout_s 590 (docs/benchmarks.md, "One H200").
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/data}
wheels=(
  ml-collections==1.1.0 grain==0.2.18 tensorflow-datasets==4.9.10 array-record==0.8.6
  tensorboardX==2.6.5 flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
  # dependencies of the above that the device's image lacks (docs: KINDS.md's package list)
  dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
  portpicker==1.6.0
)
sources=(promise==2.3)  # pure Python, published as a source archive only: built into a wheel here
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"
python3 -m pip wheel -q --no-deps -w .whl "${sources[@]}"
# pip leaves a wheel of another version in place: keep one per package (two stop the install).
python3 - <<'EOF'
import collections, os, re
names = collections.defaultdict(list)
for f in sorted(os.listdir('.whl')):
  names[re.split(r'-\d', f, maxsplit=1)[0].lower().replace('_', '-')].append(f)
dupes = {k: v for k, v in names.items() if len(v) > 1}
if dupes:
  raise SystemExit(f'.whl holds several versions of {sorted(dupes)}: remove the old ones')
EOF
mkdir -p .gpu_data/mvtec_ad
rm -rf .gpu_data/mvtec_ad/bottle
cp -r "$shared/mvtec_ad/bottle" .gpu_data/mvtec_ad/bottle
du -sh .whl .gpu_data
