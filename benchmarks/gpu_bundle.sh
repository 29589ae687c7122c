#!/usr/bin/env bash
# Fetch the wheels that benchmarks/gpu.py needs on the GPU device machine and
# print the device tool's `run` call that uses them.
#
#     bash benchmarks/gpu_bundle.sh            # -> build/gpu_wheels/
#
# The device machine (nvidia-h200: Python 3.12, x86-64) has JAX with CUDA,
# PyTorch, Triton, numpy, ml-dtypes, absl-py, rich, h5py, packaging, einops and
# typing-extensions, but no Keras and no network. Keras 3.15.1 needs besides
# those only namex (pure Python) and optree (a cp312 binary wheel).
# flash-linear-attention's kernels (`fla.ops`) ship in `fla-core`; the
# `flash-linear-attention` wheel holds only its layers and models (and pulls in
# transformers on import), so it is not carried. The package under test is the
# working tree itself (PYTHONPATH=$PWD there).
#
# build/ is ignored by .gitignore, so the wheels travel only when `carry`
# names the folder, and never reach git. They must stay under the tool's
# 64 MiB (working tree included); this script checks.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${DEST:-build/gpu_wheels}
WHEELS=(keras==3.15.1 namex==0.1.0 optree==0.20.0 fla-core==0.6.0)
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    -d "$DEST" "${WHEELS[@]}"

ls -l "$DEST"/*.whl
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "wheels: $((total / 1024)) KiB in $DEST"
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
    echo "too large: the carried wheels and the working tree must fit in 64 MiB" >&2
    exit 1
fi

cat <<EOF

Device tool call (run), carry ["$DEST"], timeout_s 480:

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $DEST/*.whl && export PYTHONPATH=/tmp/site:\$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 || exit; nvidia-smi; python3 benchmarks/gpu.py --max-seconds 300 --out \$OUT/gpu.json 2>&1 | tee \$OUT/gpu.log

Then copy the returned gpu.json to benchmarks/results/gpu.json.
EOF
