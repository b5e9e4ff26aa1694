# Source this on the GPU test machine (../shared/docs/GPU.md): installs the wheels carried in .gpu/whl and kvtier
# itself (kvtier.kernels / kvtier.policies are mapped folders, so a plain PYTHONPATH checkout does not import).
# Building kvtier needs setuptools >= 77 (pyproject's SPDX license): carry its wheel in .gpu/whl where the machine's
# is older. Expects SmolLM2's GGUF joined at /tmp/kvm (see README, "Measuring on the GPU").
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site KVTIER_MODEL_DIR=/tmp/kvm PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . 2>&1 | grep -v WARNING
