#!/usr/bin/env bash
# The CPU recipe on CARS196 (results/cars196_recipe.md): benchmarks/recipe.sh with DATASET=cars196.
# Usage: bash benchmarks/cars196_recipe.sh [RUN_FOLDER] [CGD-TRAIN OPTIONS...]
exec bash "$(dirname "$0")/recipe.sh" cars196 "${1:-runs/cars196_recipe}" "${@:2}"
