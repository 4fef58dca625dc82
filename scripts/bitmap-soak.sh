#!/usr/bin/env bash
# The kill -9 soak for crash-safe bitmaps, long: many rounds of random kills during mixed NBD
# writes on qcow2 and on raw (sidecar), each checked as test/block/bitmap-soak.test.ts checks it
# (flushed writes present, bitmap a superset of the writes or marked inconsistent, never short;
# qemu-img check clean after each restart and clean stop). The test suite runs 3 rounds.
#
#   scripts/bitmap-soak.sh [ROUNDS_PER_FORMAT] [SEEDS...]     default 100 rounds, one random seed
#
# Prints tap's summary per seed; exit status 1 if any round failed. About 3 s per round.
set -uo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-100}"
shift || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=("$((RANDOM * 3 + 1))")
bash scripts/setup.sh --test >/dev/null
status=0
for seed in "${seeds[@]}"; do
  echo "bitmap-soak: seed $seed, $rounds rounds per format" >&2
  out=$(VDISK_SOAK_ROUNDS="$rounds" VDISK_SEED="$seed" npx tap --timeout=$((rounds * 30 + 120)) --reporter=tap test/block/bitmap-soak.test.ts 2>&1)
  echo "$out" | grep -E '^\s*not ok' -A12 || true
  summary=$(echo "$out" | grep -E '^# \{ total' | tail -1)
  echo "bitmap-soak: seed $seed: $summary"
  echo "$summary" | grep -q 'fail' && status=1
done
exit $status
