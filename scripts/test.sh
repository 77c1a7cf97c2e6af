#!/usr/bin/env bash
# Runs the whole test suite: unit and property tests, then the veth-namespace tests against the
# real kernel (root needed). Installs what is missing first: see scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RELAY_SETUP_DONE=1
exec cargo xtask test "$@"
