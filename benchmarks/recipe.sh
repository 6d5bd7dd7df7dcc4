#!/usr/bin/env bash
# The CPU recipe as a user runs it: `cgd-train --recipe cpu` (pip ImageNet Lite0 weights, a fifth of the training
# classes held out to select the epoch), then cgd-eval on the test classes. The same training command on every data
# set; only the reader changes. About 90 min on 2 idle cores for CARS196 (longer where the held-out classes hold
# more images). The recipe's settings are in cgd_heads/training/recipes.py and docs/training.md ("Named recipes"):
# 224 px, SG, frozen BatchNorm, Adam 1e-4 (head 1e-3), cosine, 30 updates of 128 per epoch, no temperature scaling
# or label smoothing (they lost on CARS196's held-out classes: results/cars196_recipe_tricks.md), images loaded in the
# training process (results/speed.md). Where the CPU has bf16 instructions (avx512_bf16 or AMX in /proc/cpuinfo) it
# trains 16 epochs in channels_last with bf16 autocast (recipe cpu-bf16: 2.2x the images/s of float32 at 224 px
# here, results/cars196_recipe.md); without them 6 epochs in float32 (cpu-fp32; 78.5 min here). Until commit
# 114b6db this script spelt those settings out as options; `--recipe` sets the same values (tests/training/
# test_recipes.py checks it against that command line).
# Usage: bash benchmarks/recipe.sh [DATASET] [RUN_FOLDER] [CGD-TRAIN OPTIONS...]
#   DATASET: cars196 (default), caltech101, omniglot; options after the run folder are passed on to cgd-train and
#   override the recipe's (e.g. --temperature 0.5 --label-smoothing 0.1: the paper's classifier tricks, a variant
#   compared on the held-out classes; --no-channels-last); the run folder is set here, not by --out
#   data: $CGD_HEADS_DATA/<dataset>, default ../shared/data
#   BF16=auto (default: --recipe cpu, which reads the x86 flags), 1 (cpu-bf16) or 0 (cpu-fp32); EPOCHS (default
#   the recipe's: 16 with bf16, 6 without), IMG_SIZE (default the recipe's, 224).
# Then retrain on all training classes for the chosen epoch count: EPOCHS=N bash benchmarks/recipe.sh DATASET RUN2
# --val-classes 0 (best/ is then the last epoch's weights; on CARS196: benchmarks/cars196_recipe.sh,
# results/cars196_recipe_all98.md).
# Variants, compared on the held-out classes only: BF16=0 (6 float32 epochs: results/cars196_recipe_float32.md),
# IMG_SIZE=160 EPOCHS=8 BF16=0 (the first CARS196 recipe, results/cars196_recipe_160.md)
set -euo pipefail
DATASET=${1:-cars196}
RUN=${2:-runs/${DATASET}_recipe}
ROOT=${CGD_HEADS_DATA:-../shared/data}
case "$DATASET" in
  cars196) READER=(--data "$ROOT/cars196/images" --dataset folder --train-classes 98) ;;  # classes 1-98 train
  caltech101) READER=(--data "$ROOT/caltech101" --dataset caltech101) ;;  # first 50 classes train, 51 test
  omniglot) READER=(--data "$ROOT/omniglot" --dataset omniglot) ;;  # small1 train, small2 (unseen) test
  *) echo "recipe.sh: DATASET must be cars196, caltech101 or omniglot, not '$DATASET'" >&2; exit 2 ;;
esac
for option in "${@:3}"; do
  if [[ $option == --out || $option == --out=* ]]; then
    echo "recipe.sh: give the run folder as the second argument, not --out (cgd-eval reads RUN_FOLDER/best)" >&2
    exit 2
  fi
done
case "${BF16:-auto}" in
  auto) RECIPE=cpu ;;
  1) RECIPE=cpu-bf16 ;;
  0) RECIPE=cpu-fp32 ;;
  *) echo "recipe.sh: BF16 must be auto, 1 or 0, not '$BF16'" >&2; exit 2 ;;
esac
SIZES=()
if [[ -n ${IMG_SIZE:-} ]]; then SIZES+=(--img-size "$IMG_SIZE"); fi
if [[ -n ${EPOCHS:-} ]]; then SIZES+=(--epochs "$EPOCHS"); fi
start=$(date +%s)
cgd-train "${READER[@]}" --recipe "$RECIPE" "${SIZES[@]}" --no-test --quiet --out "$RUN" "${@:3}"
trained=$(date +%s)
cgd-eval --checkpoint "$RUN/best" "${READER[@]}" --output "$RUN/test_metrics.json"
echo "{\"cgd-train\": $((trained - start)), \"cgd-eval\": $(( $(date +%s) - trained ))}" > "$RUN/timing.json"
