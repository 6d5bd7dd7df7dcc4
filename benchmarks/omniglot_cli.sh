#!/usr/bin/env bash
# Omniglot from scratch with the command-line tools (results/omniglot_cli.md): cgd-train with the library's defaults
# (the paper's settings: SG, temperature 0.5, label smoothing 0.1, step schedule x0.1 at 60% and 80% of the updates,
# a tenth of the training classes held out to select the epoch) on a ResNet-18 from random initialisation at 64 px,
# then cgd-eval of the selected checkpoint on the unseen test alphabets. About 6 min on 2 idle cores.
# Usage: bash benchmarks/omniglot_cli.sh [RUN_FOLDER] [CGD-TRAIN OPTIONS...]   (e.g. --seed 1)
#   data: $CGD_HEADS_DATA/omniglot, default ../shared/data/omniglot
set -euo pipefail
RUN=${1:-runs/omniglot_r18_64}
DATA=${CGD_HEADS_DATA:-../shared/data}/omniglot
start=$(date +%s)
cgd-train --data "$DATA" --model resnet18 --img-size 64 --epochs 20 --batch-size 64 --m-per-class 4 --lr 1e-3 \
  --num-workers 2 --no-test --quiet --out "$RUN" "${@:2}"
trained=$(date +%s)
cgd-eval --checkpoint "$RUN/best" --data "$DATA" --num-workers 2 --quiet --output "$RUN/test_metrics.json"
echo "{\"cgd-train\": $((trained - start)), \"cgd-eval\": $(( $(date +%s) - trained ))}" > "$RUN/timing.json"
