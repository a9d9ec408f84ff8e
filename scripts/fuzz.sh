#!/usr/bin/env bash
# Fuzzing: every target in fuzz/ (one per parser of bytes a peer controls)
# for SECONDS each (default 20), seeded from fuzz/seeds/TARGET, with
# libFuzzer through cargo-fuzz on the stable toolchain (--sanitizer none:
# pgbastion has no unsafe code, so a panic is what there is to find).
# New inputs go to a temporary corpus; a crash fails the script and
# leaves its input in fuzz/artifacts/TARGET/ (reproduce with
# `cd fuzz && cargo fuzz run -s none TARGET artifacts/TARGET/crash-...`).
#
#   bash scripts/fuzz.sh          # CI: a short run of every target
#   bash scripts/fuzz.sh 600      # a long run: 10 minutes per target
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install --locked --quiet cargo-fuzz
fi
cd fuzz
cargo fuzz build -s none -O
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for t in $(cargo fuzz list); do
    mkdir -p "$work/$t"
    if ! cargo fuzz run -s none -O "$t" "$work/$t" "seeds/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$work/$t.log" 2>&1; then
        tail -n 40 "$work/$t.log"
        echo "fuzz target $t FAILED (input saved under fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    execs=$(grep -E '^stat::number_of_executed_units' "$work/$t.log" | awk '{print $2}')
    echo "fuzz $t: ${secs} s, ${execs:-?} executions, no crash"
done
