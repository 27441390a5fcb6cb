#!/usr/bin/env bash
# `make test`'s last line, from ctest's JUnit file: `tests: N passed, N failed, N skipped`. Skips are counted, and
# named above that line, because a skipped test checked nothing (a fresh clone with setup.sh's packages has none).
# Prints only; `make test`'s exit status stays ctest's.
set -uo pipefail
f=${1:?usage: test-summary.sh CTEST_JUNIT_XML}
if [ ! -s "$f" ]; then
  echo "tests: no results ($f was not written)"
  exit 0
fi
head=$(tr '\n' ' ' <"$f" | grep -o '<testsuite [^>]*>' | head -n 1)
attr() { sed -n "s/.*[[:space:]]$1=\"\([0-9]*\)\".*/\1/p" <<<"$head"; }
total=$(attr tests) failed=$(attr failures) skipped=$(attr skipped) disabled=$(attr disabled)
skipped=$((${skipped:-0} + ${disabled:-0}))
grep -o '<testcase name="[^"]*"[^>]*status="notrun"' "$f" | sed 's/<testcase name="\([^"]*\)".*/  skipped: \1/'
echo "tests: $((total - failed - skipped)) passed, $failed failed, $skipped skipped"
