#!/usr/bin/env bash
# One installer for every GPU recipe; egs2/<corpus>/asr1/install_recipe.sh links here and the
# recipe is the directory of the link that was run. It installs that recipe into an ESPnet
# checkout as egs2/<corpus>_compress/asr1 (or egs2/<name>/asr1):
#   run.sh, cmd.sh, README.md    copied (edit them there: GPUs, back-end, ...)
#   conf/                        copied from <plugin>/conf/<corpus> (--link-conf: symlink it instead)
#   asr.sh db.sh path.sh pyscripts scripts steps utils -> ../../TEMPLATE/asr1/...  (as every recipe)
#   local -> ../../<corpus>/asr1/local   ESPnet's own data preparation and scoring for the corpus
# Nothing in ESPnet's own egs2/<corpus>/asr1 is modified. Re-running refreshes an earlier install
# (overwriting its run.sh, cmd.sh, README.md and configs).
# The plugin must be installed in ESPnet's Python environment (pip install -e <plugin>).
set -e
set -u
set -o pipefail

usage="Usage: $0 [--link-conf] <espnet_root> [<recipe_name>]   (default name: <corpus>_compress)"
link_conf=false
if [ $# -gt 0 ] && [ "$1" = --link-conf ]; then
    link_conf=true
    shift
fi
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "${usage}" 1>&2
    exit 2
fi
die() { echo "$0: Error: $*" 1>&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)   # <plugin>/egs2/<corpus>/asr1
corpus=$(basename "$(dirname "${here}")")
plugin_root=$(cd "${here}/../../.." && pwd -P)
conf_src=${plugin_root}/conf/${corpus}
[ -d "$1" ] || die "no such directory: $1"
espnet_root=$(cd "$1" && pwd -P)
name=${2:-${corpus}_compress}

[ -f "${espnet_root}/egs2/TEMPLATE/asr1/asr.sh" ] \
    || die "${espnet_root} is not an ESPnet checkout (no egs2/TEMPLATE/asr1/asr.sh)"
[ -f "${espnet_root}/egs2/${corpus}/asr1/local/data.sh" ] \
    || die "ESPnet's ${corpus} recipe is missing (no egs2/${corpus}/asr1/local/data.sh); update ESPnet"
[ -d "${conf_src}" ] || die "missing recipe configs: ${conf_src}"
case "${name}" in
    "${corpus}" | TEMPLATE | */* | "") die "refusing recipe name '${name}' (would touch ESPnet's own files)";;
esac

dst=${espnet_root}/egs2/${name}/asr1
mkdir -p "${dst}"
for f in run.sh cmd.sh README.md; do
    cp "${here}/${f}" "${dst}/${f}"
done
chmod +x "${dst}/run.sh"
for f in asr.sh db.sh path.sh pyscripts scripts steps utils; do
    ln -sfn "../../TEMPLATE/asr1/${f}" "${dst}/${f}"
done
if [ -e "${dst}/local" ] && [ ! -L "${dst}/local" ]; then
    die "${dst}/local exists and is not a symlink; move it away first"
fi
ln -sfn "../../${corpus}/asr1/local" "${dst}/local"
if [ -L "${dst}/conf" ]; then
    rm "${dst}/conf"
fi
if "${link_conf}"; then
    [ ! -e "${dst}/conf" ] || die "${dst}/conf exists and is not a symlink; move it away first"
    ln -s "${conf_src}" "${dst}/conf"
else
    mkdir -p "${dst}/conf"
    cp -r "${conf_src}/." "${dst}/conf/"
fi

for f in asr.sh db.sh path.sh pyscripts scripts steps utils local conf local/data.sh; do
    [ -e "${dst}/${f}" ] || die "${dst}/${f} does not resolve"
done
echo "Installed ${dst}"
echo "Next: point db.sh (${espnet_root}/egs2/TEMPLATE/asr1/db.sh) at the corpus, then: cd ${dst} && ./run.sh"
