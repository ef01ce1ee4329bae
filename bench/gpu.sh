#!/usr/bin/env bash
# The GPU check of the performance issue (target 4) as one command, for a machine with a CUDA GPU:
# the CUDA tests, then d2l_resnet18 at 96 px against the chapter's loop (same run), the `fast`
# recipe's time to 92.4% over 3 seeds, and eval throughput. Each figure is written as JSON to
# $OUT (default ./gpu-results); the log goes there too.
#
# It runs without installing: the machine's own python3 with PyTorch and the project's
# dependencies (numpy, safetensors, tqdm, matplotlib, pillow, pytest), the package from src/.
# No network is needed when Fashion-MNIST is in $RESNETLAB_DATA (default ./.data, ignored by git):
#     mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
#     bash bench/gpu.sh            # about 5 minutes on one H100/H200
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RESNETLAB_DATA=${RESNETLAB_DATA:-$PWD/.data}
exec > >(tee "$out/gpu-log.txt") 2>&1

$py - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("bench/gpu.sh: no CUDA GPU visible to PyTorch; run it on a machine with one")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}")
EOF
$py -m resnetlab data info fashion-mnist

status=0
step() { echo "== $1"; shift; "$@" || status=1; }
# the command's output to the log, its last line (the --json object) to $out/FILE
json_to() { local file=$1; shift; "$@" | tee /dev/stderr | tail -n 1 > "$out/$file"; }
d2l=(bench train --model d2l_resnet18 --resize 96 --device cuda --steps 200 --warmup 20 --workers 4 --json)

step "CUDA tests" $py -m pytest -q -p no:cacheprovider tests/test_cuda.py
step "d2l_resnet18 at 96 px: chapter loop vs resnetlab" json_to bench-train.json $py -m resnetlab "${d2l[@]}"
step "the same with torch.compile" json_to bench-train-compile.json $py -m resnetlab "${d2l[@]}" --compile
step "fast recipe: time to 92.4%, 3 seeds" json_to time-to-accuracy.json \
    $py -m resnetlab bench time-to-accuracy --recipe fast --target 0.924 --seeds 3 --device cuda --json
step "eval throughput" json_to bench-infer.json \
    $py -m resnetlab bench infer --model d2l_resnet18 --resize 96 --device cuda --json
echo "== done (exit $status); figures in $out"
exit $status
