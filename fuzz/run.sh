#!/usr/bin/env bash
# Runs every cargo-fuzz target for a fixed number of executions on its corpus (fuzz/corpus,
# kept in the repo; new inputs found are added to it). CI runs a short pass; a nightly-style
# run uses FUZZ_RUNS=10000000. A crash leaves its input in fuzz/artifacts/<target>/ and fails
# the script: turn it into a regression test before fixing.
# usage: fuzz/run.sh [TARGET...]   (env FUZZ_RUNS, default 20000; FUZZ_MAX_S caps each target, default 600;
#        FUZZ_ARGS: more libFuzzer flags, e.g. "-max_len=8192")
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${FUZZ_RUNS:-20000}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(xs_wire inventory_values decode rules engine config control)
pass=0 fail=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    if RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" "fuzz/corpus/$t" -- -runs="$runs" -max_total_time="${FUZZ_MAX_S:-600}" ${FUZZ_ARGS:-} \
        >"/tmp/fuzz-$t.log" 2>&1; then
        echo "ok - fuzz $t: $(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "/tmp/fuzz-$t.log" | tail -1)"
        pass=$((pass + 1))
    else
        echo "not ok - fuzz $t: $(grep -m1 -E 'panicked|ERROR|error' "/tmp/fuzz-$t.log" | cut -c1-200) (log /tmp/fuzz-$t.log)"
        fail=$((fail + 1))
    fi
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
