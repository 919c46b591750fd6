#!/usr/bin/env bash
# Build the one-folder bundle dist/tugboat/ with PyInstaller, check it holds no CUDA libraries,
# print its size and run the smoke test. Not part of CI: it takes several minutes.
#   bash packaging/build.sh              build, check, smoke test
#   bash packaging/build.sh --no-smoke   build and check only
# Needs the project venv (bash tools/install.sh) plus PyInstaller: .venv/bin/pip install pyinstaller
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"

"$PY" -c "import PyInstaller" 2>/dev/null || { echo "PyInstaller is missing: $PY -m pip install pyinstaller" >&2; exit 2; }
"$PY" packaging/make_icons.py --check

start=$(date +%s)
"$PY" -m PyInstaller --noconfirm --log-level WARN --distpath dist --workpath build/pyinstaller packaging/tugboat.spec
echo "built dist/tugboat in $(( $(date +%s) - start )) s"

cuda=$(find dist/tugboat \( -name 'libcud*' -o -name 'libcublas*' -o -name 'libcufft*' -o -name 'libcusparse*' \
       -o -name 'libnccl*' -o -name 'libnvrtc*' -o -name 'libnvJitLink*' -o -name 'libtorch_cuda*' -o -name 'libc10_cuda*' \
       -o -path 'dist/tugboat/_internal/nvidia' -o -path 'dist/tugboat/_internal/triton' \) | head -5)
if [ -n "$cuda" ]; then
  echo "CUDA files in the CPU bundle (install the CPU torch: pip install torch==2.13.0):" >&2
  echo "$cuda" >&2
  exit 1
fi
echo "size: $(du -sh dist/tugboat | cut -f1) ($(find dist/tugboat -type f | wc -l) files)"

[ "${1:-}" = "--no-smoke" ] || "$PY" packaging/smoke_test.py dist/tugboat/tugboat
