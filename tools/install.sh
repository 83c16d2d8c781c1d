#!/usr/bin/env bash
# Install everything espnet_compress needs on a fresh Debian machine of the project's kind:
#   * Debian packages: espeak-ng and sox (the tiny corpus), sctk (sclite / sc_stats scoring);
#   * a virtual environment at .venv/ with torch/torchaudio/espnet and this package (editable).
# Idempotent: a second run checks what is there and returns in seconds.
#
# Versions are the measured clean path (see README): pip 24.0 (pip >= 26 rejects espnet's ci_sdr),
# torch/torchaudio 2.11.0 as a matching pair (import espnet2.tasks.asr needs torchaudio), espnet 202511.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
venv="$here/.venv"
stamp="$venv/.espnet_compress_installed"

# ---- Debian packages -------------------------------------------------------------------------
need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need_apt+=(sox)
[ -x /usr/lib/sctk/bin/sclite ] || command -v sclite >/dev/null 2>&1 || need_apt+=(sctk)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "[install] apt-get install ${need_apt[*]}"
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# ---- Python environment ----------------------------------------------------------------------
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ] && "$venv/bin/python" -c "import espnet_compress, espnet2.tasks.asr, resampy" 2>/dev/null; then
    echo "[install] .venv is up to date"
    exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --disable-pip-version-check "pip==24.0"
$pip install -q --disable-pip-version-check "torch==2.11.0" "torchaudio==2.11.0"
# resampy: ESPnet's recipe scripts import it (TEMPLATE pyscripts/audio/format_wav_scp.py, asr.sh stage 3)
$pip install -q --disable-pip-version-check "espnet==202511" "espnet_model_zoo==0.1.7" tensorboard "resampy==0.4.3"
$pip install -q --disable-pip-version-check -e ".[test]"
$pip check
touch "$stamp"
echo "[install] done: $venv"
