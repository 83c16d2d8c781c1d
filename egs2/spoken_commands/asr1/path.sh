# path.sh of spoken_commands for a plain virtual environment: no ESPnet tools/ installation
# (TEMPLATE's path.sh sources <espnet>/tools/activate_python.sh and extra_path.sh instead).
# The Python that runs asr.sh's stages is the first python3 on PATH: activate the venv holding
# espnet and espnet_compress first, or name it with ESPNET_COMPRESS_VENV=/path/to/venv.
if [ -n "${ESPNET_COMPRESS_VENV:-}" ]; then
    # shellcheck disable=SC1091
    . "${ESPNET_COMPRESS_VENV}/bin/activate"
fi
if ! python3 -c "import espnet2, espnet_compress" 2>/dev/null; then
    echo "path.sh: Error: $(command -v python3 || echo python3) cannot import espnet2 and espnet_compress;" \
        "activate their virtual environment or set ESPNET_COMPRESS_VENV=/path/to/venv" 1>&2
    return 1 2>/dev/null || exit 1
fi

export PATH=${PWD}/utils/:${PATH}
# sclite for asr.sh stage 13: Debian's sctk package installs it outside PATH
[ -d /usr/lib/sctk/bin ] && export PATH=${PATH}:/usr/lib/sctk/bin
export LC_ALL=C
export OMP_NUM_THREADS=1
export PYTHONIOENCODING=UTF-8

. local/path.sh
