#!/usr/bin/env bash
# GPU and mixed-precision check (never run by CI, which has no GPU): the full pipeline recipe
# (KD snapshot teacher -> structured pruning -> QAT -> int8 -> DeviceBenchmark) on one CUDA device with
# --trainer.precision=bf16-mixed, compressed to 4 one-batch epochs on 64x64 synthetic data, then `validate` of its
# last checkpoint on the GPU (the int8 network runs on the CPU, see README "GPU and mixed precision"), then the
# CUDA tests of tests/callbacks/test_mixed_precision.py. Under 5 minutes on any CUDA machine.
#   bash scripts/gpu_check.sh            # prints one line: "gpu_check: PASS in 123 s" (or FAIL, exit 1)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
[ -x .venv/bin/python ] || bash scripts/bootstrap.sh
PY=.venv/bin/python
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); run it on a CUDA machine." >&2
    exit 2
fi
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"

work="$(mktemp -d "${TMPDIR:-/tmp}/segcompress_gpu_check.XXXXXX")"
status=0
summary() {
    local verdict=$1
    echo "gpu_check: $verdict in $(( $(date +%s) - start )) s (logs and run folder: $work)"
}

# the recipe's schedule compressed into 4 epochs: prune in epoch 1, QAT from epoch 2 (a smaller encoder too)
"$PY" - "$work/full_pipeline.yaml" <<'PYEOF'
import sys
import yaml
config = yaml.safe_load(open("recipes/full_pipeline.yaml"))
config["trainer"]["max_epochs"] = 4
config["model"]["init_args"]["network"]["init_args"]["encoder_name"] = "tu-mobilenetv3_small_100"
for callback in config["trainer"]["callbacks"]:
    args = callback.setdefault("init_args", {})
    if callback["class_path"].endswith("StructuredPruning"):
        args.update(start_epoch=1, end_epoch=2, steps=1)
    if callback["class_path"].endswith("QuantizationAwareTraining"):
        args.update(start_epoch=2, freeze_bn_epoch=3, freeze_observer_epoch=3)
yaml.safe_dump(config, open(sys.argv[1], "w"))
PYEOF

# the recipe's own CI smoke override (64x64, 2 images, 1 batch per epoch, one benchmark run)
read -r -a smoke <<< "$(grep '^# CI smoke override:' recipes/full_pipeline.yaml | sed 's/^# CI smoke override://')"
gpu=(--trainer.accelerator=gpu --trainer.devices=1 --trainer.precision=bf16-mixed)

echo "gpu_check: fit (full pipeline, bf16-mixed, cuda)"
if ! timeout 240 .venv/bin/segcompress fit --config "$work/full_pipeline.yaml" "${smoke[@]}" "${gpu[@]}" \
        --trainer.default_root_dir="$work/run" --trainer.enable_progress_bar=false > "$work/fit.log" 2>&1; then
    tail -n 40 "$work/fit.log"; echo "gpu_check: fit failed"; status=1
fi
grep -q "segcompress fit finished" "$work/fit.log" || status=1
grep -h "int8 network stays on the CPU" "$work/fit.log" | head -n 1 || true

ckpt="$(ls "$work"/run/*/version_0/checkpoints/last.ckpt 2>/dev/null | head -n 1 || true)"
if [ "$status" = 0 ] && [ -n "$ckpt" ]; then
    echo "gpu_check: validate $ckpt on cuda (int8 on the CPU)"
    if ! timeout 120 .venv/bin/segcompress validate --config "$work/full_pipeline.yaml" "${smoke[@]}" "${gpu[@]}" \
            --trainer.default_root_dir="$work/validate" --trainer.enable_progress_bar=false \
            --ckpt_path="$ckpt" > "$work/validate.log" 2>&1; then
        tail -n 40 "$work/validate.log"; echo "gpu_check: validate failed"; status=1
    fi
else
    echo "gpu_check: no last.ckpt written"; status=1
fi

echo "gpu_check: CUDA tests (tests/callbacks/test_mixed_precision.py -k cuda)"
if ! timeout 180 "$PY" -m pytest -p no:xdist -q tests/callbacks/test_mixed_precision.py -k cuda; then
    echo "gpu_check: CUDA tests failed"; status=1
fi

if [ "$status" = 0 ]; then summary PASS; else summary FAIL; exit 1; fi
