#!/usr/bin/env bash
# A style edit on the original release's frame folder: no --blend, so the source
# structure is kept everywhere, and the style word is strengthened.
# Usage: examples/car-turn-style.sh [FRAME_FOLDER] [extra fatezero options]
set -euo pipefail
frames=${1:-../shared/data/teaser_car-turn}
shift || true
fatezero run "$frames" \
    --src "a silver jeep driving down a curvy road in the countryside" \
    --edit "watercolor painting of a silver jeep driving down a curvy road in the countryside" \
    --reweight watercolor=2 --side-by-side -o outputs/car-turn-watercolor.mp4 "$@"
