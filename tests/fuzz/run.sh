#!/usr/bin/env bash
# Builds the TPM parser fuzz target with clang (libFuzzer + ASan + UBSan) and
# runs it: tests/fuzz/run.sh [RUNS] (default 1000000). Seeds are the real GCE
# quotes, signatures and attestation key. A crash, leak or sanitizer report
# fails the run.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-1000000}
out=${KEYGATE_FUZZ_DIR:-build-fuzz}
mkdir -p "$out/corpus"
cp tests/fixtures/real/tpm/*.attest.bin tests/fixtures/real/tpm/*.tpmt_signature.bin \
  tests/fixtures/real/tpm/gce-cos85.ak.tpmt_public.bin "$out/corpus/"
srcs=(core/*.cc tpm/tpm2_format.cc tests/fuzz/tpm_parse_fuzzer.cc)
if [ ! -x "$out/tpm_parse_fuzzer" ] || [ -n "$(find "${srcs[@]}" core/*.h tpm/*.h -newer "$out/tpm_parse_fuzzer" 2>/dev/null)" ]; then
  clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I. -I/usr/include/jsoncpp \
    -DKEYGATE_FUZZ_AK="\"$(pwd)/tests/fixtures/real/tpm/gce-cos85.ak.tpmt_public.bin\"" \
    "${srcs[@]}" -lcrypto -ljsoncpp -o "$out/tpm_parse_fuzzer"
fi
# The corpus grows in $out/corpus; findings would land in $out/.
"$out/tpm_parse_fuzzer" -runs="$runs" -max_len=2048 -print_final_stats=1 \
  -artifact_prefix="$out/" "$out/corpus" 2>&1 | tail -n 15
