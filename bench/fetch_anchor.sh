#!/usr/bin/env bash
# Prepares bench/anchor/ (git-ignored: add "/bench/anchor/" to .gitignore) for bench/run_gpu.sh: a copy of the
# PyTorch anchor (../shared/bench: torch_anchor.py, configs.py) and the diffusers wheel it needs, which the GPU
# machine lacks and cannot download (it has no network). Run here, where PyPI is reachable:
#     bash bench/fetch_anchor.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
shared="${SHARED_BENCH:-$repo/../shared/bench}"
anchor="$repo/bench/anchor"
mkdir -p "$anchor"
install -m 644 "$shared/torch_anchor.py" "$shared/configs.py" "$shared/README.md" "$anchor/"
ls "$anchor"/diffusers-0.42.1-*.whl >/dev/null 2>&1 ||
  python3 -m pip download --no-deps --only-binary=:all: -d "$anchor" diffusers==0.42.1
ls -la "$anchor"
