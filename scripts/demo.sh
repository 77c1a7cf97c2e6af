#!/usr/bin/env bash
# Relays multicast on a throw-away veth topology and prints what happened. Needs root.
# Installs what is missing first (apt packages, toolchains, bpf-linker): see scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RELAY_SETUP_DONE=1
exec cargo xtask demo "$@"
