#!/usr/bin/env bash
# Builds .carry/ (git-ignored, ~60 MB) on a networked machine with `make install` done: what a
# GPU machine without network needs besides its preinstalled torch (see bench/device_env.sh):
# numpy<2, grpcio/protobuf/rapidjson and tritonclient (without its perf_analyzer binaries)
# for Python 3.12, llguidance (bench_grammar), fastapi/uvicorn/pydantic (bench_api), the demo
# model's tokenizer files (no `textgen demo-model` there), and tritonserver's parts of the
# nvidia-pytriton wheel (Python 3.12 stub).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .carry && mkdir .carry
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .carry numpy==1.26.4 tritonclient==2.51.0 grpcio==1.85.1 protobuf==4.25.9 python-rapidjson==1.20 \
  llguidance==1.9.1
# the REST front end (bench_api), at server.lock's versions: those of its dependencies that the
# device image lacks (KINDS.md lists the image's packages; the first run found fastapi's
# opentelemetry-api missing when these versions were written here by hand)
pinned() { for name in "$@"; do grep -m1 "^$name==" requirements/server.lock | cut -d' ' -f1; done; }
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .carry \
  $(pinned fastapi starlette pydantic pydantic-core uvicorn annotated-types typing-inspection \
    annotated-doc opentelemetry-api)
DEMO=$(.venv/bin/textgen demo-model)
mkdir .carry/demo-tokenizer
cp "$DEMO"/tokenizer.json "$DEMO"/tokenizer_config.json .carry/demo-tokenizer/
.venv/bin/python - <<'PY'
import pathlib, zipfile
wheel = next(pathlib.Path(".carry").glob("tritonclient-*.whl"))
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if "/bin/" not in item.filename:
            data = src.read(item.filename)
            if item.filename.endswith("RECORD"):
                data = b"\n".join(l for l in data.split(b"\n") if b"/bin/" not in l)
            dst.writestr(item, data)
slim.replace(wheel)
PY
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
tar -C "$SITE" -cJf .carry/tritonserver.tar.xz \
  --exclude='python_backend_stubs/3.8' --exclude='python_backend_stubs/3.9' \
  --exclude='python_backend_stubs/3.10' --exclude='python_backend_stubs/3.11' \
  --exclude='python_backend_stubs/3.13' --exclude='backends/python/triton_python_backend_stub' \
  --exclude='libpython3-*.so*' --exclude='__pycache__' \
  pytriton/__init__.py pytriton/tritonserver nvidia_pytriton.libs
du -sh .carry
