#!/usr/bin/env bash
# The wheels a device call carries (carry: ["wheels"]): what the lent GPU machine lacks beside
# its torch, transformers, triton, nvidia-ml-py, pandas and pyarrow (Python 3.12 there).
# Run here, with the project's .venv: bash bench/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
.venv/bin/pip wheel -q --no-deps fairscale==0.4.13 -w wheels   # sdist only: built here
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp \
  jsonschema jsonschema-specifications referencing rpds-py attrs sentencepiece submitit cloudpickle -d wheels
ls wheels
