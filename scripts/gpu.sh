#!/usr/bin/env bash
# The GPU check of the performance issue (target 4) as one command, for a machine with a CUDA GPU:
# the CUDA tests, then d2l_resnet18 at 96 px against the chapter's loop (same run), the `fast`
# recipe's time to 92.4% over 3 seeds, the `accurate`, `best` and `d2l` recipes' accuracy, and eval
# throughput. Each figure is written as JSON to
# $OUT (default ./gpu-results); the log goes there too.
#
# It runs without installing: the machine's own python3 with PyTorch and the project's
# dependencies (numpy, safetensors, tqdm, matplotlib, pillow, pytest), the package from src/.
# No network is needed when Fashion-MNIST is in $RESNETLAB_DATA (default ./.data, ignored by git):
#     mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
#     bash scripts/gpu.sh            # about 12-15 minutes on one H100/H200 (estimated; never run there yet)
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
    raise SystemExit("scripts/gpu.sh: no CUDA GPU visible to PyTorch; run it on a machine with one")
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
tta=(bench time-to-accuracy --recipe fast --target 0.924 --device cuda --json)
step "fast recipe: time to 92.4%, 3 seeds" json_to time-to-accuracy.json $py -m resnetlab "${tta[@]}" --seeds 3
# The fast recipe is tuned for a 2-core CPU (24 px, width 16, batch 128: 1407 small steps). On a GPU
# the FLOPs are nearly free and the steps' count is what costs, so: the native 28 px with the same
# steps (92.90% on seed 0 on the CPU), the earlier CPU recipe's 938 steps of batch 256 (92.75%), and
# an untried wider net at batch 512 (469 steps). The GPU target counts training seconds
# (`median_train_seconds`); the recipe to adopt is the one that reaches 92.4% there soonest, so
# these test after every epoch (fast itself tests after the last only) to see an earlier crossing.
step "fast at 28 px, 3 seeds" json_to tta-gpu-28px.json $py -m resnetlab "${tta[@]}" --seeds 3 --train-args="--resize 0 --eval-every 1"
step "fast at 28 px, batch 256, 4 epochs, 3 seeds" json_to tta-gpu-b256.json $py -m resnetlab "${tta[@]}" --seeds 3 \
    --train-args="--resize 0 --batch-size 256 --lr 0.2 --epochs 4 --eval-every 1"
step "width 32 at 28 px, batch 512, 4 epochs, 1 seed" json_to tta-gpu-w32-b512.json $py -m resnetlab "${tta[@]}" --seeds 1 \
    --train-args="--resize 0 --width 32 --batch-size 512 --lr 0.8 --epochs 4 --eval-every 1"
# The other GPU targets: `accurate` (>= 94.0%), `best` (>= 95.5%) and the chapter's `d2l`, whose final
# accuracy must land within the chapter's 0.904-0.924; one seed each, test accuracy after the last epoch.
step "accurate recipe, 1 seed" json_to tta-accurate.json $py -m resnetlab bench time-to-accuracy \
    --recipe accurate --target 0.94 --device cuda --seeds 1 --json
step "best recipe, 1 seed" json_to tta-best.json $py -m resnetlab bench time-to-accuracy \
    --recipe best --target 0.955 --device cuda --seeds 1 --json
step "d2l recipe, 1 seed" json_to tta-d2l.json $py -m resnetlab bench time-to-accuracy \
    --recipe d2l --target 0.904 --device cuda --seeds 1 --json
step "eval throughput" json_to bench-infer.json \
    $py -m resnetlab bench infer --model d2l_resnet18 --resize 96 --device cuda --json
echo "== done (exit $status); figures in $out"
exit $status
