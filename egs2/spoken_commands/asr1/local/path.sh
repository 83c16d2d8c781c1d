# Nothing corpus-specific: espnet_compress must be installed in ESPnet's Python environment
# (pip install -e /path/to/espnet_compress), which also installs the registration hook.
