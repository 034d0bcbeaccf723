#!/usr/bin/env bash
# r2r 0.9.7's build script turns on sim-time support (cfg r2r__rosgraph_msgs__msg__Clock) only when
# it generates its bindings, not when it reuses them from an earlier run; a rerun of it (after an
# environment change) then builds nodes that silently ignore use_sim_time. When a build output of
# r2r lacks that cfg, drop its cached bindings and its fingerprint so the next build regenerates.
set -euo pipefail
target="${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}"
for out in "$target"/*/build/r2r-*/output; do
  [ -f "$out" ] || continue
  grep -q 'rustc-cfg=r2r__rosgraph_msgs__msg__Clock' "$out" && continue
  dir="$(dirname "$out")"
  echo "r2r bindings in $dir lack sim-time support: regenerating them"
  rm -f "$dir"/out/*/done "$out"
  rm -rf "$(dirname "$(dirname "$dir")")/.fingerprint/$(basename "$dir")"
done
