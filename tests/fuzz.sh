#!/usr/bin/env bash
# Fuzzing (README "Fuzzing"; tests/run.sh calls it with a short time, CI runs it).
#
# Usage: tests/fuzz.sh [SECONDS [TARGET...]]
#
# Builds the libFuzzer targets of shared/fuzz, agent/fuzz and dns-server/fuzz (cargo-fuzz
# layout; one workspace rooted in dns-server/fuzz) with the coverage flags cargo-fuzz uses
# without a sanitizer (`cargo fuzz build -s none`: stable Rust, no cargo-fuzz install), then
# runs each TARGET (default: all) for SECONDS (default 20), one process each, from its
# checked-in seeds (<crate>/fuzz/seeds/<target>/; new finds go to target/fuzz/corpus/<target>/,
# outside git). A crash, timeout or out-of-memory fails the run: the input is kept in
# target/fuzz/artifacts/<target>/ and the command to replay it is printed.
#
# FUZZ_PROFILE=release builds as cargo-fuzz does (opt-level 3, for long runs); the default
# profile `fuzz-ci` (dns-server/fuzz/Cargo.toml) builds faster for the short CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${1:-20}
shift || true

declare -A crate_of=(
  [message_file]=shared [registration]=shared
  [relay_frames]=agent
  [dns_query]=dns-server [registration_zone]=dns-server
)
all=(message_file registration relay_frames dns_query registration_zone)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [ -n "${crate_of[$t]:-}" ] || { echo "tests/fuzz.sh: unknown target $t (${all[*]})" >&2; exit 64; }
done

if ! command -v c++ >/dev/null 2>&1; then
  # libfuzzer-sys compiles libFuzzer (C++); tests/run.sh installs g++ when root.
  [ "${CI:-}" = "true" ] && { echo "tests/fuzz.sh: ERROR: no C++ compiler on CI" >&2; exit 1; }
  echo "*** SKIP: fuzzing needs a C++ compiler (apt-get install g++) ***" >&2
  exit 0
fi

profile=${FUZZ_PROFILE:-fuzz-ci}
triple=$(rustc -vV | sed -n 's/^host: //p')
out="$root/target/fuzz"
# What `cargo fuzz build -s none` passes (cargo-fuzz 0.13), release-only -Ccodegen-units=1
# left to the profile. With --target, build scripts and proc macros stay uninstrumented.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions"
t0=$SECONDS
echo "tests/fuzz.sh: building the fuzz workspace (dns-server/fuzz; profile $profile)"
cargo build --quiet --manifest-path dns-server/fuzz/Cargo.toml --workspace --bins \
  --target "$triple" --profile "$profile" --target-dir "$out"
echo "tests/fuzz.sh: built in $((SECONDS - t0)) s"

passed=0 failed=0
for t in "${targets[@]}"; do
  c=${crate_of[$t]}
  bin="$out/$triple/$profile/$t"
  corpus="$out/corpus/$t"
  artifacts="$out/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  log="$out/$t.log"
  if "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts" "$corpus" "$c/fuzz/seeds/$t" >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    echo "fuzz $t: ${runs:-?} executions in ${secs} s, ${cov:-cov: ?}, no crash"
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "############################################################################" >&2
    echo "# fuzz $t: FAILED (crash, timeout or out of memory); log: $log" >&2
    grep -E '^(==[0-9]+==|thread .* panicked|SUMMARY|artifact_prefix|Test unit written)' "$log" >&2 || tail -30 "$log" >&2
    echo "# replay: $bin <artifact>   (or cargo test after adding it to $c/fuzz/seeds/$t/)" >&2
    echo "############################################################################" >&2
  fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" = 0 ]
