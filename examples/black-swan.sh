#!/usr/bin/env bash
# Invert the black-swan clip once, then edit it three ways from the same cache.
# Usage: examples/black-swan.sh [VIDEO] [extra fatezero options, e.g. --model /models/sd-v1-4]
set -euo pipefail
video=${1:-../shared/data/clips/black-swan.mp4}
shift || true
tail="swimming in a river near a wall and bushes"

cache=$(fatezero invert "$video" --src "a black swan with a red beak $tail" "$@")
echo "cache: $cache" >&2

fatezero edit "$cache" --blend "black swan" -o outputs/black-swan \
    --edit "a white duck with a yellow beak $tail" \
    --edit "a pink flamingo with a red beak $tail" \
    --edit "a Swarovski crystal swan with a red beak $tail" \
    --save-masks --json
