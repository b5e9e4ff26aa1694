#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then find a passkey at 2x SmolLM2's window, stock vs kvtier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# torch's OpenMP threads spin between ops by default; on small VMs that costs ~4 ms per op (measured: a
# policy's selection took 290 ms instead of 19 ms on 2 cores). Passive waiting removes it.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/kvtier demo "$@"
