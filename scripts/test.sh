#!/usr/bin/env bash
# Set up the environment, check lint and formatting (ruff, ruff.toml), build the documentation site (docs/, warnings
# are errors, into the ignored docs/_build/), and run the test suite on the real data in ../shared/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
