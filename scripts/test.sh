#!/usr/bin/env bash
# Set up the environment and run the test suite on the real data in ../shared/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
