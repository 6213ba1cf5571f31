#!/usr/bin/env bash
# Install the tested torch (constraints.txt) into a venv, as the machine wants it:
#   scripts/install_torch.sh PIP
# - an NVIDIA GPU (nvidia-smi answers): the build for the newest CUDA the driver supports, from
#   PyTorch's wheel index (cu130, cu128 or cu126); PyPI's own Linux wheel is the CUDA 13 build.
# - no NVIDIA GPU on Linux: the CPU-only build from PyTorch's CPU index (no CUDA libraries to
#   download), when that index answers; otherwise the default index, with a note.
# - macOS / Windows: the default index (PyPI's wheels there are the right ones).
# TORCH_INDEX_URL=... overrides the choice.
set -euo pipefail
pip=$1
spec=$(grep -E '^torch==' "$(dirname "$0")/../constraints.txt")
index=${TORCH_INDEX_URL:-}
if [[ -z $index && $(uname -s) == Linux ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1\2/p' | head -1) && [[ -n $cuda ]]; then
    for build in 130 128 126; do
      if (( cuda >= build )); then index=https://download.pytorch.org/whl/cu$build; break; fi
    done
    [[ -n $index ]] || echo "note: the NVIDIA driver supports CUDA ${cuda:0:-1}.${cuda: -1}, older than torch's builds (12.6+): installing the default build" >&2
  else
    index=https://download.pytorch.org/whl/cpu
  fi
  if [[ -n $index ]] && ! "$(dirname "$pip")/python" -c "import urllib.request; urllib.request.urlopen('$index/torch/', timeout=5)" 2>/dev/null; then
    echo "note: $index does not answer: installing $spec from the default index" >&2
    index=
  fi
fi
if [[ -n $index ]]; then
  echo "installing $spec from $index"
  "$pip" install --quiet --index-url "$index" "$spec"
else
  "$pip" install --quiet "$spec"
fi
