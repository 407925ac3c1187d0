#!/usr/bin/env bash
# Prepares a lent GPU machine (Python 3.12 with torch preinstalled, no network) to run textgen:
# a venv that sees the preinstalled torch, with numpy<2 and tritonclient from .carry/ (wheels),
# tritonserver from the nvidia-pytriton wheel's parts (.carry/tritonserver.tar.xz), and our
# three packages linked in. Source it from the repository root:  . bench/device_env.sh
# (.carry/ is made on a networked machine: see bench/RESULTS.md, "Running on the GPU machine").
set -e
echo "[device_env] PYTHONPATH was '${PYTHONPATH:-}'"
unset PYTHONPATH  # the image may point it at the preinstalled site-packages (numpy 2)
# realpath: sourced again in a shell where the venv is active, torch is found through our links
TORCH_SITE=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(os.path.realpath(torch.__file__))))")
rm -rf /tmp/v /tmp/torch_site /tmp/textgen_pkgs  # idempotent on a warm machine
python3 -m venv /tmp/v
SITE=$(/tmp/v/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
/tmp/v/bin/python -m pip install -q --no-index --no-deps --no-compile .carry/*.whl
# The preinstalled packages, less numpy 2 and what needs it (scipy, sklearn: transformers
# imports sklearn when present), linked into one directory that the venv appends to its path.
mkdir -p /tmp/torch_site
for entry in "$TORCH_SITE"/*; do
  case "$(basename "$entry")" in
    numpy*|scipy*|sklearn*|scikit_learn*|*.pth) ;;
    *) ln -sfn "$entry" /tmp/torch_site/ ;;
  esac
done
echo /tmp/torch_site > "$SITE/zz_torch_site.pth"
mkdir -p /tmp/textgen_pkgs
ln -sfn "$PWD/src/textgen_backend" /tmp/textgen_pkgs/textgen_backend
ln -sfn "$PWD/src/textgen_kernels" /tmp/textgen_pkgs/textgen_kernels
ln -sfn "$PWD/src/textgen_client" /tmp/textgen_pkgs/textgen_client
ln -sfn "$PWD/src/textgen_api" /tmp/textgen_pkgs/textgen_api
echo /tmp/textgen_pkgs > "$SITE/textgen.pth"
tar -C "$SITE" -xJf .carry/tritonserver.tar.xz
set +e
. /tmp/v/bin/activate
python -c "import sys; print('[device_env] sys.path', sys.path)"
python -c "import numpy, torch, triton, transformers, tritonclient.grpc, textgen_kernels, textgen_backend, textgen_api.app; from transformers import LlamaForCausalLM; print('[device_env] numpy', numpy.__version__, 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
