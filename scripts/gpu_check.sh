#!/usr/bin/env bash
# The first GPU run, end to end, into one results folder (default results/gpu-check):
#   1. installs the CUDA build of JAX (the `cuda12` extra) and the development extras into .venv-gpu;
#   2. checks that JAX sees a GPU, and records the devices and versions;
#   3. runs the test suite;
#   4. runs the Pallas kernels' tests compiled (not interpreted) against the XLA path;
#   5. runs `jaxopt-lab bench --group norms`: the Pallas kernels, the XLA path and flax side by side;
#   6. prints, per norm, dtype, shape and context, the kernel against the XLA path and flax, and the keys of
#      jaxopt_lab.normalization._pallas.VERIFIED those figures justify (pallas_decision.md);
#   7. runs every experiment in quick mode.
# Every step's output is kept in the folder; the script stops at the first step that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu-check}
mkdir -p "$OUT"
# Several test processes share one GPU: allocate on demand rather than 75% of the memory each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
step() { echo "[gpu-check] $1 ($(date +%T))" | tee -a "$OUT/steps.log"; }

step "install"
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q -e '.[cuda12,dev]' 2>&1 | tee "$OUT/install.log"

step "devices"
.venv-gpu/bin/python - <<'PY' | tee "$OUT/devices.txt"
import jax
from jaxopt_lab.lab.experiment import environment
from jaxopt_lab.normalization import _pallas
print(jax.devices())
print(environment())
assert jax.default_backend() == "gpu", f"no GPU backend: {jax.devices()}"
assert _pallas.available(), "the Pallas kernels cannot compile here"
PY

step "test suite"
.venv-gpu/bin/python -m pytest -n 4 -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"

step "Pallas kernels compiled"
JAXOPT_LAB_PALLAS_COMPILED=1 .venv-gpu/bin/python -m pytest -q -p no:cacheprovider tests/test_pallas_norm.py \
    2>&1 | tee "$OUT/pallas_compiled.txt"

step "bench: norms"
.venv-gpu/bin/jaxopt-lab bench --group norms --out "$OUT" 2>&1 | tee "$OUT/bench.log"

step "decide: the kernels against the XLA path and flax, and the VERIFIED keys they justify"
.venv-gpu/bin/python - "$OUT/bench/metrics.json" <<'PY' | tee "$OUT/pallas_decision.md"
import json, sys
import jax
from jaxopt_lab.lab.bench.norms import pallas_decision
print(pallas_decision(json.loads(open(sys.argv[1]).read())["rows"], jax.default_backend()), end="")
PY

step "quick experiments"
.venv-gpu/bin/jaxopt-lab run all --quick --no-progress --out "$OUT" 2>&1 | tee "$OUT/run_all_quick.log"

step "done: $OUT/pallas_decision.md, $OUT/bench/summary.md, $OUT/REPORT.md"
