#!/usr/bin/env bash
# Builds the fuzz targets (CMake, clang: libFuzzer + ASan + UBSan, in
# build-fuzz/) and runs each: every parser of untrusted bytes.
#   tests/fuzz/run.sh                      each target for 10^6 executions
#   tests/fuzz/run.sh --runs N [TARGET...] each for N executions
#   tests/fuzz/run.sh --seconds S [TARGET...]
#                                          each for S seconds (.ci/run's short run)
# Seeds: the real fixtures (tests/fixtures/real) and the hand-made ones in
# tests/fuzz/seeds (tests/fuzz/make_seeds.py); each target's corpus grows
# in build-fuzz/corpus/TARGET. A crash, leak, sanitizer report or timeout
# fails the run, and the input that caused it is left in build-fuzz/ (run
# the target on that file to reproduce). A table of executions and corpus
# sizes ends the output.
set -euo pipefail
cd "$(dirname "$0")/../.."
limit=(-runs=1000000)
if [ "${1:-}" = --runs ]; then limit=(-runs="$2"); shift 2
elif [ "${1:-}" = --seconds ]; then limit=(-max_total_time="$2"); shift 2
elif [ -n "${1:-}" ] && [ "${1#-}" = "$1" ] && [ "$1" -eq "$1" ] 2>/dev/null; then limit=(-runs="$1"); shift
fi
all=(tpm_parse cms jwt server_request client_answer luks_token settings audit_record policy_file)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
out=${KEYGATE_FUZZ_DIR:-build-fuzz}

CC=clang CXX=clang++ cmake -S . -B "$out" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKEYGATE_FUZZ=ON >/dev/null
cmake --build "$out" -j "$(nproc)" --target "${targets[@]/%/_fuzzer}" >/dev/null

fixtures=tests/fixtures/real
seeds_of() {
  case $1 in
    tpm_parse) ls $fixtures/tpm/*.attest.bin $fixtures/tpm/*.tpmt_signature.bin \
                  $fixtures/tpm/gce-cos85.ak.tpmt_public.bin ;;
    cms) ls $fixtures/aws/*.der $fixtures/azure/*.pkcs7.der $fixtures/aws/*.document.json \
            $fixtures/azure/*.document.json ;;
    jwt) ls $fixtures/gcp/*.jwt $fixtures/gcp/*.json ;;
  esac
  [ -d "tests/fuzz/seeds/$1" ] && ls "tests/fuzz/seeds/$1"/* || true
}

summary=()
for t in "${targets[@]}"; do
  corpus="$out/corpus/$t"
  mkdir -p "$corpus"
  seeds_of "$t" | while read -r f; do cp "$f" "$corpus/"; done
  log="$out/$t.log"
  echo "== fuzz $t (${limit[*]})"
  if ! ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
       "$out/${t}_fuzzer" "${limit[@]}" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
       -print_final_stats=1 -artifact_prefix="$out/$t-" "$corpus" >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz $t: FINDING (input in $out/$t-*, log $log)" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  secs=$(sed -n 's/^stat::.*//;s/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\2/p' "$log")
  summary+=("$(printf '%-16s %12s %8s %10s' "$t" "$runs" "${secs:-?}" "$(ls "$corpus" | wc -l)")")
done
printf '%-16s %12s %8s %10s\n' target executions seconds corpus
printf '%s\n' "${summary[@]}"
