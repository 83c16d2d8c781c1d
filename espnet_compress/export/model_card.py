"""Model card (Markdown beside the zip, in the style of ESPnet's Hugging Face cards) of one system.

Every number comes from the files the comparison report was made from, never from a second
measurement: WER, errors, MAPSSWE verdict, decode speed, parameters and checkpoint bytes from
``compare.json`` (written by ``python -m espnet_compress.bin.compare`` together with
``compare.md``); the zip's own size from the zip. The card refuses a zip that does not hold the
checkpoint the report scored (same bytes), so a card can never describe another model.

The commands to reproduce are the records the tools left: asr.sh's ``run.sh`` in the training
experiment dir and in the decode dir, ``export.json`` of an export
(:mod:`espnet_compress.export.asr_exp`), ``decode_systems.json`` of a per-system decode and the
comparison's ``command.sh``.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml

from espnet_compress.export.asr_exp import read_record
from espnet_compress.utils.params import PARAMETER_RULE

PathLike = Union[str, Path]

#: Options of ``encoder_conf``/``model_conf`` that say what a system computes.
_SPEC_KEYS = (("encoder_conf", "plan"), ("encoder_conf", "fold"), ("encoder_conf", "quant_conf"),
              ("model_conf", "decoder_quant"))


class ModelCardError(ValueError):
    """The inputs of a card do not fit together; the message names the file and the fix."""


def card_path(zip_file: PathLike) -> Path:
    """Where the card of ``zip_file`` goes: beside it, same name, ``.md``."""
    return Path(zip_file).with_suffix(".md")


def write_model_card(compare_dir: PathLike, system: str, zip_file: PathLike, out: Optional[PathLike] = None,
                     command: Optional[List[str]] = None) -> Path:
    """Write the card of ``system`` (a row of ``compare_dir/compare.json``) packed as ``zip_file``."""
    from espnet_compress.utils.io import atomic_write_text

    compare_dir, zip_file = Path(compare_dir), Path(zip_file)
    report = _read_json(compare_dir / "compare.json", "run python -m espnet_compress.bin.compare first")
    rows = {row["name"]: row for row in report["systems"]}
    if system not in rows:
        raise ModelCardError(f"system '{system}' is not in {compare_dir / 'compare.json'} (it has {list(rows)})")
    row, baseline = rows[system], rows[report["baseline"]]
    conf, model_member = _check_zip(zip_file, row)
    out = card_path(zip_file) if out is None else Path(out)
    record = read_record(Path(row["model_file"]).parent)
    text = render(report, row, baseline, conf, zip_file, model_member, _commands(row, compare_dir, command), record)
    atomic_write_text(out, text)
    return out


def render(report: Mapping[str, Any], row: Mapping[str, Any], baseline: Mapping[str, Any], conf: Mapping[str, Any],
           zip_file: Path, model_member: str, commands: List[Tuple[str, str]],
           record: Optional[Mapping[str, Any]] = None) -> str:
    """The card's Markdown (separate from file handling so its content is easy to check)."""
    name, test_sets = row["name"], report["test_sets"]
    lines = [
        "---",
        "tags: [espnet, audio, automatic-speech-recognition, espnet_compress]",
        "library_name: espnet",
        "pipeline_tag: automatic-speech-recognition",
        "---",
        "",
        f"## ESPnet2 ASR model: `{zip_file.stem}` (espnet_compress system `{name}`)",
        "",
        f"System `{name}` of the model trained with encoder `{conf.get('encoder')}` and model "
        f"`{conf.get('model', 'espnet')}`; it needs the `espnet_compress` plugin installed unless the "
        "model is `espnet` with a stock encoder.",
        "",
        "### System",
        "",
        "```yaml",
        yaml.safe_dump(system_spec(conf, name, record), sort_keys=False).rstrip(),
        "```",
        "",
        f"### Results (from `compare.json`, baseline `{report['baseline']}`)",
        "",
        "| test set | WER (%) | words | errors (sub/del/ins) | MAPSSWE vs baseline | RTF |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for ts in test_sets:
        cell = row["test_sets"][ts]
        wer, speed = cell["wer"], cell["speed"]
        lines.append(f"| {ts} | {wer['wer']:.2f} | {wer['num_words']:,} | "
                     f"{wer['substitutions']}/{wer['deletions']}/{wer['insertions']} | {cell['verdict']} | "
                     f"{'n/a' if speed is None else format(speed['rtf'], '.3f')} |")
    lines += [
        "",
        f"MAPSSWE: two-sided matched-pair test (sclite `sc_stats`) at alpha={report['alpha']:g}; \"lossless\" = no "
        "significant difference. RTF: decoding time / audio duration as asr.sh stage 12 measured it "
        "(n/a: decoded without asr.sh).",
        "",
        "### Size",
        "",
        "| | this system | baseline |",
        "|---|---:|---:|",
        f"| parameters | {_int(row['num_params'])} | {_int(baseline['num_params'])} |",
        f"| checkpoint bytes | {_int(row['checkpoint_bytes'])} | {_int(baseline['checkpoint_bytes'])} |",
        f"| zip bytes (this file's archive) | {zip_file.stat().st_size:,} | |",
        "",
        f"Checkpoint in the zip: `{model_member}`. Size ratio to the baseline checkpoint: "
        f"{'n/a' if row['size_ratio'] is None else format(row['size_ratio'], '.3f')}. "
        f"Counting rule: {PARAMETER_RULE}.",
        "",
        "### How to use",
        "",
        "```python",
        "# pip install espnet espnet_model_zoo espnet_compress  (the plugin registers its names on import of ESPnet)",
        "from espnet2.bin.asr_inference import Speech2Text",
        f"speech2text = Speech2Text.from_pretrained(\"{zip_file.name}\")  # or its Hugging Face repo",
        "text, *_ = speech2text(speech)[0]",
        "```",
        "",
        "### Reproduce",
        "",
    ]
    for title, cmd in commands:
        lines += [f"{title}:", "", "```bash", cmd, "```", ""]
    lines += [
        "### Training config",
        "",
        "<details><summary>expand</summary>",
        "",
        "```yaml",
        yaml.safe_dump(dict(conf), sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def system_spec(conf: Mapping[str, Any], name: str, record: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What the system computes: its entry of ``model_conf.systems`` (in the model's own config, or,
    for an exported system, in the config of the model it was exported from), then the plan, fold
    and quantization options of the config in the zip (per-module bit rules counted per width)."""
    spec: Dict[str, Any] = {"system": name, "encoder": conf.get("encoder")}
    systems = (conf.get("model_conf") or {}).get("systems") or {}
    if name in systems:
        spec["spec"] = systems[name] or {}
    elif record and record.get("system"):
        source = Path(record["source_asr_exp"]) / "config.yaml"
        source_conf = yaml.safe_load(source.read_text(encoding="utf-8")) if source.is_file() else {}
        source_systems = (source_conf.get("model_conf") or {}).get("systems") or {}
        spec["exported_from"] = {"asr_exp": record["source_asr_exp"], "system": record["system"],
                                 "spec": source_systems.get(record["system"])}
    for section, key in _SPEC_KEYS:
        value = (conf.get(section) or {}).get(key)
        if value is not None:
            spec[key] = _summarise_bits(value) if key == "quant_conf" else value
    return spec


def _summarise_bits(quant_conf: Mapping[str, Any]) -> Dict[str, Any]:
    """``quant_conf`` with a per-module ``bits`` table shown as modules per width (the full table
    is in the training config at the end of the card)."""
    bits = quant_conf.get("bits")
    if not isinstance(bits, Mapping):
        return dict(quant_conf)
    widths: Dict[str, int] = {}
    for value in bits.values():
        widths[f"{value}-bit modules"] = widths.get(f"{value}-bit modules", 0) + 1
    return {**quant_conf, "bits": widths}


def _check_zip(zip_file: Path, row: Mapping[str, Any]) -> Tuple[Dict[str, Any], str]:
    """The training config in the zip and the name of its checkpoint member, after checking that
    the member is the checkpoint ``compare.json`` scored (same bytes)."""
    if not zip_file.is_file():
        raise ModelCardError(f"{zip_file} does not exist: pack the model first (asr.sh stage 14, --skip_packing false)")
    if row["model_file"] is None:
        raise ModelCardError(f"compare.json has no model file for system '{row['name']}': rerun compare with "
                             "--system NAME DECODE_DIR MODEL_FILE")
    with zipfile.ZipFile(zip_file) as zf:
        meta = yaml.safe_load(zf.read("meta.yaml"))
        member, config_member = meta["files"]["asr_model_file"], meta["yaml_files"]["asr_train_config"]
        packed_digest = hashlib.sha256(zf.read(member)).hexdigest()
        conf = yaml.safe_load(zf.read(config_member))
    scored = Path(row["model_file"])
    if hashlib.sha256(scored.read_bytes()).hexdigest() != packed_digest:
        raise ModelCardError(
            f"{zip_file} holds {member}, not the checkpoint compare.json scored for '{row['name']}' ({scored}); "
            f"pack the scored file (asr.sh --inference_asr_model {scored.name} --stage 14 --skip_packing false)")
    return conf, member


def _commands(row: Mapping[str, Any], compare_dir: Path, card_command: Optional[List[str]]) -> List[Tuple[str, str]]:
    """(title, command) pairs from the records the tools left, in the order they ran."""
    model_dir = Path(row["model_file"]).parent
    export = read_record(model_dir)
    train_dir = Path(export["source_asr_exp"]) if export else model_dir
    out: List[Tuple[str, str]] = []
    if (train_dir / "run.sh").is_file():
        out.append((f"Training (the asr.sh command recorded in `{train_dir / 'run.sh'}`)",
                    _asr_sh_record(train_dir / "run.sh")))
    if export and export.get("command"):
        out.append(("Export", shlex.join(export["command"])))
    decode_dir = Path(row["decode_dir"])
    decode = _read_json(decode_dir / "decode_systems.json", None) if (decode_dir / "decode_systems.json").is_file() else None
    if decode:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in decode["env"].items())
        out.append(("Decoding (through `decode_systems`, which ran)", f"{env} {shlex.join(decode['command'])}"))
    elif (decode_dir / "run.sh").is_file():
        out.append((f"Decoding, scoring and packing (the asr.sh command recorded in `{decode_dir / 'run.sh'}`)",
                    _asr_sh_record(decode_dir / "run.sh")))
    if (compare_dir / "command.sh").is_file():
        out.append(("Comparison report", (compare_dir / "command.sh").read_text(encoding="utf-8").strip()))
    if card_command:
        out.append(("This card", shlex.join(card_command)))
    return out


def _asr_sh_record(run_sh: Path) -> str:
    """The asr.sh command line a ``run.sh`` record of asr.sh holds: asr.sh writes the invocation
    plus ``--stage N "$@"; exit $?`` (to resume at stage N), which is removed here."""
    return re.sub(r' --stage \d+ "\$@"; exit \$\?$', "", run_sh.read_text(encoding="utf-8").strip())


def _read_json(path: Path, fix: Optional[str]) -> Dict[str, Any]:
    if not path.is_file():
        raise ModelCardError(f"{path} does not exist: {fix}")
    return json.loads(path.read_text(encoding="utf-8"))


def _int(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value:,}"
