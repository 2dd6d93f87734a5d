#!/usr/bin/env bash
# Fuzzes the parsers of files users download (fuzz/fuzz_targets/*.rs) with cargo-fuzz: builds
# every target in one cargo build, then runs each for SECONDS (default 5) from its seed corpus
# fuzz/corpus/<target>/. Exits non-zero on the first target that crashes (panic, overflow,
# allocation over 512 MB, a run over 5 s), printing the crashing input's path.
#
#   scripts/fuzz.sh [SECONDS]            all targets
#   FUZZ_TARGETS="gguf torch" scripts/fuzz.sh 60
#
# New inputs the fuzzer finds go to a scratch directory, not into the committed corpus.
set -euo pipefail

SECONDS_EACH="${1:-5}"
CARGO_FUZZ_VERSION="0.13.1"
cd "$(dirname "$0")/../fuzz"

if [[ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

# cargo-fuzz builds with -Z flags (sanitizer, coverage instrumentation) that only nightly rustc
# takes; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
# -O: optimized (with debug assertions and overflow checks on, -a and fuzz/Cargo.toml's profile);
# the same flags on build and run, so that run does not rebuild.
FUZZ_FLAGS=(-O -a)

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
cargo fuzz build "${FUZZ_FLAGS[@]}"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in $targets; do
    mkdir -p "$scratch/$target" "artifacts/$target"
    echo "=== fuzz $target for ${SECONDS_EACH}s"
    # The first corpus directory receives new inputs; the seeds are only read.
    if ! cargo fuzz run "${FUZZ_FLAGS[@]}" "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=512 -malloc_limit_mb=512 -timeout=5 \
        -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
        tail -n 40 "$scratch/$target.log"
        # The cause (a panic message, an out-of-memory or timeout report) is above the stack.
        grep -m 3 -E 'panicked at|^==[0-9]+==ERROR|ERROR: libFuzzer' "$scratch/$target.log" >&2 || true
        crash="$(grep -o 'Test unit written to [^ ]*' "$scratch/$target.log" | tail -n 1 | cut -d' ' -f5)"
        echo "FUZZ FAILURE in target $target; crashing input: ${crash:-fuzz/artifacts/$target/}" >&2
        echo "reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${FUZZ_FLAGS[*]} $target ${crash:-<input>}" >&2
        exit 1
    fi
    grep -E '^#[0-9]+ +DONE|^stat::number_of_executed_units' "$scratch/$target.log" | tr '\n' ' '
    echo
done
echo "fuzz: every target ran ${SECONDS_EACH}s without a crash"
