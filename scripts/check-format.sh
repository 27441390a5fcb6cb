#!/usr/bin/env bash
# Every C++/CUDA source is as `make format` (clang-format with .clang-format) leaves it; lists the files that are
# not. Run by `make test` (ctest: Format.SourcesAreClangFormatted) and `make format-check`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || { echo "check-format: clang-format not found (make setup installs it)" >&2; exit 2; }
bad=()
while IFS= read -r f; do
  clang-format --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f")
done < <(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')
if [ ${#bad[@]} -ne 0 ]; then
  echo "check-format: ${#bad[@]} file(s) differ from clang-format (run 'make format'):"
  printf '  %s\n' "${bad[@]}"
  exit 1
fi
echo "check-format: every source is clang-formatted ($(clang-format --version | grep -o 'version [0-9.]*'))"
