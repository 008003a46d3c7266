#!/usr/bin/env bash
# Moves the shipped weights (49 MB) out of the work tree and back, so that a copy of the tree plus
# .whl and .gpucache sent to a GPU machine stays small (no GPU step needs the shipped weights).
#   bash benchmarks/weights_aside.sh out     (moves them out of the work tree)
#   bash benchmarks/weights_aside.sh back    (puts them back, checks their SHA-256)
#   bash benchmarks/weights_aside.sh status  (the size of that copy against a 64 MiB limit)
# Never commit while the weights are aside.
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS=src/polypseg/models/weights/kvasir-unet-r34.safetensors
ASIDE="${WEIGHTS_ASIDE:-$HOME/.polypseg-weights-aside}"
LIMIT=$((64 * 1024 * 1024))
travel_bytes() {  # tracked files present in the work tree + .whl + .gpucache
  { git ls-files -z | xargs -0 stat -c %s 2>/dev/null || true  # a file aside is missing: not sent
    find .whl .gpucache -type f -exec stat -c %s {} + 2>/dev/null || true; } \
    | awk '{ s += $1 } END { print s + 0 }'
}
expected_sha() { git show "HEAD:$WEIGHTS" | sha256sum | cut -d' ' -f1; }
case "${1:-status}" in
  out)
    [[ -f "$WEIGHTS" ]] || { echo "error: $WEIGHTS is not here (already aside in $ASIDE?)" >&2; exit 2; }
    mkdir -p "$ASIDE" && mv "$WEIGHTS" "$ASIDE/"
    echo "moved $WEIGHTS to $ASIDE/; a GPU call would send $(( $(travel_bytes) / 1048576 )) MiB" ;;
  back)
    [[ -f "$ASIDE/$(basename "$WEIGHTS")" ]] || { echo "error: nothing aside in $ASIDE" >&2; exit 2; }
    mv "$ASIDE/$(basename "$WEIGHTS")" "$WEIGHTS"
    [[ "$(sha256sum "$WEIGHTS" | cut -d' ' -f1)" == "$(expected_sha)" ]] \
      || { echo "error: $WEIGHTS is back but differs from HEAD's (git checkout -- $WEIGHTS)" >&2; exit 1; }
    echo "$WEIGHTS is back, identical to HEAD's" ;;
  status)
    bytes=$(travel_bytes)
    echo "a GPU call would send $((bytes / 1048576)) MiB of the 64 MiB limit$([[ $bytes -gt $LIMIT ]] && echo ': too much, run "bash benchmarks/weights_aside.sh out" first')" ;;
  *) echo "usage: bash benchmarks/weights_aside.sh out|back|status" >&2; exit 2 ;;
esac
