#!/usr/bin/env bash
# Runs WORLD_SIZE ranks of the C++ SyncBatchNorm test at once; fails if any rank fails.
set -uo pipefail
binary=$1 world_size=$2
store=$(mktemp -u "${TMPDIR:-/tmp}/custom_bn_store.XXXXXX")
pids=()
for ((rank = 0; rank < world_size; rank++)); do
  timeout 120 "$binary" "$rank" "$world_size" "$store" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
rm -f "$store"
exit $status
