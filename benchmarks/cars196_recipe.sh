#!/usr/bin/env bash
# The final CPU recipe on CARS196 (results/cars196_recipe_all98.md): benchmarks/recipe.sh on cars196, retrained on all
# 98 training classes (--val-classes 0, the last epoch's weights) for the epoch count the held-out run chose
# (`bash benchmarks/recipe.sh cars196 RUN`, 20 classes held out: results/cars196_recipe.md).
# Usage: bash benchmarks/cars196_recipe.sh [RUN_FOLDER] [CGD-TRAIN OPTIONS...]
exec bash "$(dirname "$0")/recipe.sh" cars196 "${1:-runs/cars196_recipe_all98}" --val-classes 0 "${@:2}"
