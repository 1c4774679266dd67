#!/usr/bin/env bash
# One short check of the package on a CUDA GPU (about 5 minutes on one GPU): the device-dependent tests on the GPU
# (tests/test_device.py: float32 parity with the reference, bf16 generation, a Trainer step, sdpa = eager, FSDP when
# there is more than one GPU), then the train and generate benchmark rows at xxs and small, printed as ONE table.
#
#   scripts/device_check.sh [OUTPUT_DIR]            on a GPU machine; fails when torch sees no CUDA device
#   scripts/device_check.sh --dry-run [OUTPUT_DIR]  the same steps on the CPU at the bench's tiny size
#
# OUTPUT_DIR (default: a new temporary folder) receives each benchmark's --json file and its output (tables, log).
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
out=${1:-$(mktemp -d -t ebt-device-check.XXXXXX)}
mkdir -p "$out" || exit 1

if (( dry_run )); then
  device=cpu
  sizes=(tiny)
  train=(--batch-size 2 --seq-len 32 --steps 2 --warmup 0)
  generate=(--prompt-lengths 32 --batch-sizes 1,2 --new-tokens 8 --reps 2 --max-positions 128)
else
  gpus=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') || exit 1
  if (( gpus == 0 )); then
    echo "device_check: no CUDA GPU is visible to torch $(python -c 'import torch; print(torch.__version__)')" \
         "(built with CUDA $(python -c 'import torch; print(torch.version.cuda)')). Run this on a GPU machine with a" \
         "CUDA build of torch, or 'scripts/device_check.sh --dry-run' to check the steps on the CPU." >&2
    exit 2
  fi
  device=cuda
  sizes=(xxs small)
  train=(--batch-size 8 --seq-len 256 --steps 5 --warmup 2)
  generate=(--prompt-lengths 256 --batch-sizes 1,8 --new-tokens 32 --reps 3)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

failed=()
echo "== tests on $device (EBT_TEST_DEVICE=$device)"
EBT_TEST_DEVICE=$device python -m pytest -q -p no:cacheprovider tests/test_device.py || failed+=("tests")

for size in "${sizes[@]}"; do
  rows=standard
  [[ "$size" == "${sizes[0]}" ]] && rows=standard,compiled  # compiling takes a while: the smallest size only
  echo "== bench train, $size, $device"
  python -m modeling_ebt.bench train --device "$device" --size "$size" "${train[@]}" \
    --json "$out/train-$size.json" > "$out/train-$size.txt" 2>&1 || failed+=("train $size")
  echo "== bench generate, $size, $device (rows $rows)"
  python -m modeling_ebt.bench generate --device "$device" --size "$size" --rows "$rows" "${generate[@]}" \
    --json "$out/generate-$size.json" > "$out/generate-$size.txt" 2>&1 || failed+=("generate $size")
done

echo "== results ($out)"
python -m modeling_ebt.bench summary "$out"/train-*.json "$out"/generate-*.json || failed+=("summary")
if (( ${#failed[@]} )); then
  echo "device_check: FAILED: ${failed[*]} (logs and tables in $out)" >&2
  exit 1
fi
echo "device_check: all passed"
