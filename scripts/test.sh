#!/usr/bin/env bash
# Set up the environment, check lint and formatting (ruff, ruff.toml), and run the test suite on the
# real data in ../shared/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
