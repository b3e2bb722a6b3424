#!/usr/bin/env bash
# Time-boxed libFuzzer runs of the decoder targets (fuzz/fuzz_targets/),
# one after another, at the lowest CPU priority.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 300, every target)
#
# Stable Rust is enough: cargo-fuzz (`cargo install cargo-fuzz`) builds with
# coverage instrumentation only (`-s none`: no sanitizer, which would need
# nightly; the crates forbid unsafe code) and with debug assertions and
# overflow checks on (`-a`). New inputs go to a work corpus
# ($FUZZ_WORK, default fuzz/target/corpus/<target>); the repository's
# corpus (fuzz/corpus/<target>) is read, not written. A failing input is
# saved in fuzz/artifacts/<target>/; once fixed, put it in the corpus so
# `cargo test -p decoder-fuzz` replays it. To keep what a run found:
#   fuzz/target/.../release/<target> -merge=1 fuzz/corpus/<target> "$FUZZ_WORK/<target>"
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-300}
shift || true
if (($#)); then targets=("$@"); else
  targets=(frame_json frame_msgpack server_frame_json server_frame_msgpack api_body_json
    api_body_msgpack sse_cursor sse_request_head sdk_sse_stream)
fi
target_dir=${FUZZ_TARGET_DIR:-$PWD/target}
work=${FUZZ_WORK:-$target_dir/corpus}
nice -n 19 cargo fuzz build -O -a -s none --features libfuzzer --target-dir "$target_dir"
mkdir -p "$target_dir/logs"
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "artifacts/$t"
  echo "== $t: $secs s"
  # Inputs up to 8 KiB (the corpus's larger seeds are read truncated; the
  # test replays them whole); 5 s or 256 MiB for one input is a finding.
  nice -n 19 "$target_dir/x86_64-unknown-linux-gnu/release/$t" "$work/$t" "corpus/$t" \
    -max_total_time="$secs" -max_len=8192 -timeout=5 -rss_limit_mb=1024 -malloc_limit_mb=256 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$target_dir/logs/$t.log" 2>&1 || {
    echo "$t: FAILED (see $target_dir/logs/$t.log and artifacts/$t/)"
    continue
  }
  grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$target_dir/logs/$t.log" | tail -2
done
