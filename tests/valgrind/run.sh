#!/usr/bin/env bash
# The unlocker's paths under valgrind memcheck: the integration tests that
# drive `keygate` (enroll, unlock, keyscript, rotate, refusals, failover,
# a TPM-bound unlock, a lost confirm answer, an encrypt-in-place) with
# KEYGATE_UNLOCKER pointing at tests/valgrind/keygate. Passes only if those
# tests pass and every keygate run's log ends "ERROR SUMMARY: 0 errors".
#   tests/valgrind/run.sh BUILD_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
logs=$(mktemp -d /tmp/keygate-valgrind-XXXXXX)
# Tests whose bounds are about time (failover within two seconds, a
# deadline) are left out: memcheck runs the unlocker some 20-50 times slower.
filter=$(IFS=:; echo "${VALGRIND_TESTS[*]:-KeygateTest.EnrollThenUnlockSucceeds:KeygateTest.KeyscriptPipesTheKeyToCryptsetup:KeygateTest.RevokedVolumeIsRefused:KeygateTest.EnrollExistingVolumeKeepsItsPassphrase:KeygateTest.EncryptInPlaceThenEnrollForImageBuilders:KeygateTest.OtherAccountRegionOrInstanceIsRefused:KeygateTest.WrappedSecretAlteredInTransitIsRejected:KeygateTest.ClientPinnedToAnotherCaRefusesToTalk:KeygateTest.ServerDownFailsFastWithUnreachableCode:KeygateTest.SecondServerIsUsedWhenFirstIsUntrusted:KeygateTest.ALostConfirmAnswerIsAskedAgainAndTheVolumeStaysEnrolled:KeygateTest.FormatRefusesDeviceWithFilesystemAndServerDownLeavesDeviceUntouched:TpmUnlockTest.QuoteBackedUnlockSucceeds:TpmUnlockTest.TwoFactorVolumeNeedsBothTheServerAndTheTpm}")
KEYGATE_VALGRIND_LOGS=$logs KEYGATE_VALGRIND_TARGET=$PWD/$build/bin/keygate \
  KEYGATE_UNLOCKER=$PWD/tests/valgrind/keygate \
  "$build/tests/keygate_integration_tests" --gtest_filter="$filter" --gtest_brief=1
runs=$(ls "$logs" | wc -l)
clean=$(grep -l "ERROR SUMMARY: 0 errors from 0 contexts" "$logs"/* | wc -l)
echo "valgrind: $runs keygate runs under memcheck, $clean with no error"
if [ "$runs" -lt 20 ] || [ "$clean" -ne "$runs" ]; then
  for f in "$logs"/*; do
    grep -q "ERROR SUMMARY: 0 errors from 0 contexts" "$f" || { echo "== $f"; cat "$f"; }
  done >&2
  echo "valgrind: memcheck reports (or too few runs) in $logs" >&2
  exit 1
fi
rm -rf "$logs"
