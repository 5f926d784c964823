#!/usr/bin/env bash
# Style check of the repository, as mmdet's pre-commit hooks: flake8, isort,
# yapf and codespell (settings in setup.cfg; versions in
# requirements-lint.txt).  Checks only; `pre-commit run --all-files` (or
# `isort FILES && yapf -i FILES`) fixes the formatting.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
mapfile -t FILES < <(git ls-files '*.py' 2>/dev/null ||
                     find . -name '*.py' -not -path './build/*')
status=0
run() {
    echo "== $*" >&2
    "$@" || status=1
}
run "$PYTHON" -m flake8 "${FILES[@]}"
run "$PYTHON" -m isort --check-only --diff --quiet "${FILES[@]}"
diff=$("$PYTHON" -m yapf --diff "${FILES[@]}")
if [ -n "$diff" ]; then
    echo "== yapf: these files are not formatted (yapf -i FILE):" >&2
    echo "$diff"
    status=1
fi
run "$PYTHON" -m codespell_lib -q 3
exit $status
