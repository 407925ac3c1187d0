#!/usr/bin/env bash
# `make lock`: regenerates the lock files from pyproject.toml and requirements/*.in, for CI's
# platform (CPython 3.11, x86_64 manylinux_2_36 (Debian 12), the CPU torch in /opt/wheels). Exact versions and
# hashes; installed with `pip install --no-deps --require-hashes` (Makefile).
set -euo pipefail
cd "$(dirname "$0")"
uv=${UV:-uv}
compile() {
  "$uv" pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
    --generate-hashes --find-links /opt/wheels --custom-compile-command "make lock" "$@"
}
# The server's venv: everything pyproject.toml needs (with the test extra) and the CPU torch,
# resolved together; torch then goes into a lock of its own so a CUDA build can replace it
# (make install TORCH=...).
# The current pins seed the output file, which uv keeps where they still satisfy the inputs: a
# new dependency does not move the others (UPGRADE=1 re-resolves everything).
if [ -z "${UPGRADE:-}" ]; then cat server.lock torch-cpu.lock > all.tmp; fi
compile ../pyproject.toml --extra test torch-cpu.in -o all.tmp
python3 - <<'PY'
import re
lines = open("all.tmp").read().splitlines(keepends=True)
header = "".join(l for l in lines if l.startswith("#"))  # uv's header comes first
blocks = re.split(r"(?m)^(?=[^#\s])", "".join(lines[header.count("\n"):]))
torch = "".join(b for b in blocks if b.startswith("torch=="))
open("torch-cpu.lock", "w").write(header + torch)
open("server.lock", "w").write(header + "".join(b for b in blocks if not b.startswith("torch==")))
PY
rm all.tmp
# tritonserver's wheel without its dependencies, appended to the server's lock.
compile --no-deps tritonserver.in -o tritonserver.tmp
sed -n '/^nvidia-pytriton==/,$p' tritonserver.tmp >> server.lock
rm tritonserver.tmp
# TGI's and LoRAX's Python clients (tests of the front end), without their dependencies: they
# pin huggingface-hub<1, which transformers 5 cannot use; what they import is in the lock above.
compile --no-deps clients.in -o clients.tmp
sed -n '/^[a-z]/,$p' clients.tmp >> server.lock
rm clients.tmp
# .venv-bench: genai-perf without its declared dependencies, what it imports with theirs.
grep -v '^genai-perf' bench.in > bench-deps.tmp
compile bench-deps.tmp -o bench.lock
compile --no-deps bench.in -o genai-perf.tmp
awk '/^genai-perf==/{keep=1; print; next} /^[^ ]/{keep=0} keep' genai-perf.tmp >> bench.lock
rm bench-deps.tmp genai-perf.tmp
# The container images (deploy/Dockerfile): the server's runtime dependencies without the test
# extra, at the versions locked above, with the CPU torch (image-cpu.lock) or the CUDA one from
# PyPI with its nvidia-* libraries (image-cuda.lock; setuptools is left free for it: torch 2.11
# wants <82); tritonserver's wheel appended without its dependencies, as in server.lock.
grep -h '^[a-z].*==' server.lock torch-cpu.lock | sed 's/ .*//' > pins.tmp
compile ../pyproject.toml torch-cpu.in -c pins.tmp -o image-cpu.lock
grep -v -e '^setuptools==' -e '^torch==' pins.tmp > pins-cuda.tmp
compile ../pyproject.toml torch-cuda.in -c pins-cuda.tmp -o image-cuda.lock
compile --no-deps tritonserver.in -o tritonserver.tmp
for lock in image-cpu.lock image-cuda.lock; do
  sed -n '/^nvidia-pytriton==/,$p' tritonserver.tmp >> "$lock"
done
rm pins.tmp pins-cuda.tmp tritonserver.tmp
