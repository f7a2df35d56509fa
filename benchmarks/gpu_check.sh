#!/usr/bin/env bash
# The GPU checks of issue 12, as one script for a machine with CUDA (the `device` tool runs it in the
# repository root): the CUDA test subset, then the vit_b16 benchmark with 1,024 images on the GPU.
# Results under ${OUT:-benchmark-results/gpu}. About 5 minutes on one H200.
set -euo pipefail
out=${OUT:-benchmark-results/gpu}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$out/device.txt"
python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_distributed.py 2>&1 | tee "$out/tests.txt"
for m in mudsc-align mudsc-zip zipit; do
  python -m benchmarks.reproduce.scale --one "{\"arch\":\"vit_b16\",\"n_models\":2,\"samples\":1024,\"batch\":64,\"method\":\"$m\",\"device\":\"cuda\",\"floor\":true}" \
    | tail -1 | tee "$out/vit_b16-$m.json"
done
