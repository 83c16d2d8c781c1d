"""The egs2 user's path: what asr.sh packs is the compressed model, every system decodes under its
own tag, a model card states the report's numbers, parameters are counted by one rule.

asr.sh itself needs an ESPnet checkout (recorded in egs2/spoken_commands/asr1/README.md); here its
stage 14 is run as asr.sh runs it (``python -m espnet2.bin.pack asr`` from the recipe dir with
asr.sh's options) on a tiny model laid out by ``export_packed --asr_exp``, and the zip is loaded
the way ``Speech2Text.from_pretrained`` does in a fresh interpreter.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import yaml

from espnet_compress.bin import decode_systems, export_packed, export_system, model_card
from espnet_compress.bin.compare import main as compare_main
from espnet_compress.export.model_card import card_path
from espnet_compress.quant.packed import is_packed
from espnet_compress.scoring.sclite import SCTK_BIN_DIRS
from espnet_compress.utils.params import ParameterCountError, count_file_parameters, count_parameters
from espnet_compress.utils.tools import MissingToolError, require_tool
from tests.conftest import REPO, run_python, tiny_conformer_options
from tests.test_export import ENCODER_CONF, FEAT_DIM, _write_experiment

RECIPE = REPO / "egs2" / "spoken_commands" / "asr1"
TRAIN_CONFIGS = sorted((REPO / "conf").glob("*/train_*.yaml"))
TEST_UTTS = [f"u{i:02d}" for i in range(12)]

try:
    require_tool("sclite", "sctk", extra_dirs=SCTK_BIN_DIRS)
    HAVE_SCTK = True
except MissingToolError:
    HAVE_SCTK = False
needs_sctk = pytest.mark.skipif(not HAVE_SCTK, reason="Debian package sctk not installed")

#: Fresh interpreter (the installed hook registers the plugin): decode one utterance with the model
#: as asr.sh stage 12 loads it (exp config + packed file) and with the zip as from_pretrained does.
LOAD_SCRIPT = r'''
import json, sys, zipfile
import torch
from espnet2.bin.asr_inference import Speech2Text
from espnet_model_zoo.downloader import ModelDownloader

a = json.loads(sys.argv[1])
speech = torch.load(a["speech"])
kw = dict(device="cpu", beam_size=2, ctc_weight=0.3, nbest=1, maxlenratio=0.0)

def run(s2t):  # clones: ESPnet's global_mvn normalizes its input in place
    with torch.no_grad():
        enc, _ = s2t.asr_model.encode(speech.clone(), torch.tensor([speech.shape[1]]))
        return enc, s2t(speech[0].clone())[0][2]

out = {}
out["exp_enc"], out["exp_tokens"] = run(Speech2Text(asr_train_config=a["config"], asr_model_file=a["model"], **kw))
info = ModelDownloader(a["cache"]).download_and_unpack(a["zip"])  # what Speech2Text.from_pretrained does
out["zip_model_packed"] = "espnet_compress_packed" in str(torch.load(info["asr_model_file"], weights_only=True).keys())
out["zip_enc"], out["zip_tokens"] = run(Speech2Text(**info, **kw))
torch.save(out, a["result"])
'''


def _relativize(exp: Path, root: Path) -> None:
    """Paths in the config relative to the recipe dir, as asr.sh's stage 11 writes them (asr_train
    inlines the token list)."""
    conf = yaml.safe_load((exp / "config.yaml").read_text())
    conf["normalize_conf"]["stats_file"] = os.path.relpath(conf["normalize_conf"]["stats_file"], root)
    (exp / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))


def _asr_sh_exp(asr_task, root: Path, name: str, encoder: str, encoder_conf: Dict[str, Any], model: str,
                model_conf: Dict[str, Any]):
    """An experiment dir as asr.sh leaves it after stages 11 and 13: config.yaml (relative paths),
    valid.acc.best.pth, images/ (training curves), RESULTS.md, and asr.sh's run.sh record."""
    exp = _write_experiment(asr_task, root / "exp" / name, encoder, encoder_conf, model, model_conf)
    _relativize(exp.root, root)
    (exp.root / "images").mkdir()
    (exp.root / "images" / "loss.png").write_bytes(b"png")
    (exp.root / "RESULTS.md").write_text("# RESULTS\n")
    (exp.root / "run.sh").write_text(f'./asr.sh --asr_config conf/{name}.yaml --stage 11 "$@"; exit $?\n')
    return exp


def _pack(root: Path, exp: Path, model_name: str) -> Path:
    """asr.sh stage 14, verbatim: ``espnet2.bin.pack asr`` from the recipe dir."""
    rel = exp.relative_to(root)
    zip_path = rel / f"{rel.name}_{Path(model_name).stem}.zip"
    proc = run_python(["-m", "espnet2.bin.pack", "asr", "--asr_train_config", f"{rel}/config.yaml",
                       "--asr_model_file", f"{rel}/{model_name}", "--option", f"{rel}/RESULTS.md",
                       "--option", f"{rel}/images", "--outpath", str(zip_path)], cwd=str(root), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / zip_path


@pytest.fixture(scope="module")
def recipe(asr_task, tmp_path_factory) -> Dict[str, Any]:
    """A recipe dir with an fp32 baseline and a 4-bit QAT experiment, the QAT one exported with
    ``export_packed --asr_exp`` and both packed by asr.sh's stage 14 command."""
    root = tmp_path_factory.mktemp("recipe")
    base = _asr_sh_exp(asr_task, root, "asr_base", "conformer", ENCODER_CONF, "espnet", {"ctc_weight": 0.3})
    qat = _asr_sh_exp(asr_task, root, "asr_qat", "quantized_conformer", dict(ENCODER_CONF, quant_conf={"bits": 4}),
                      "compressed", {"ctc_weight": 0.3, "decoder_quant": {"bits": 4}})
    cwd = os.getcwd()
    os.chdir(root)  # relative config paths, as in a recipe
    try:
        assert export_packed.main(["--asr_exp", "exp/asr_qat"]) == 0
    finally:
        os.chdir(cwd)
    return {"root": root, "base": base, "qat": qat,
            "base_zip": _pack(root, base.root, "valid.acc.best.pth"),
            "qat_zip": _pack(root, qat.root, "valid.acc.best.packed.pth")}


# ------------------------------------------------------------------ configs and recipe files
@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=[str(p.relative_to(REPO)) for p in TRAIN_CONFIGS])
def test_every_config_writes_the_images_dir_asr_sh_packs(asr_task, config):
    """asr.sh stage 14 always passes --option ${asr_exp}/images; asr_train writes it only when
    use_matplotlib is on (ESPnet's default)."""
    conf = yaml.safe_load(config.read_text())
    assert conf.get("use_matplotlib", True) is True
    args = asr_task.ASRTask.get_parser().parse_args(["--config", str(config), "--token_list", "x"])
    assert args.use_matplotlib is True


def test_configs_name_asr_sh_spellings_not_the_tiny_driver():
    for config in sorted((REPO / "conf").rglob("*.yaml")):
        assert "exp/tiny" not in config.read_text(), config
    for bits in (2, 4, 8):
        text = (REPO / "conf" / "spoken_commands" / f"train_asr_quantized_conformer_tiny_{bits}bit.yaml").read_text()
        assert "--pretrained_model exp/asr_train_asr_conformer_tiny_raw_en_word/valid.acc.best.pth" in text
        assert "--init_param" in text


def test_recipe_path_sh_works_from_a_plain_venv_and_names_the_fix_without_one(tmp_path):
    venv = Path(sys.prefix)
    script = 'set -eu; . ./path.sh; python3 -c "import espnet_compress; print(espnet_compress.__file__)"; ' \
             'echo "OMP=${OMP_NUM_THREADS}"; command -v sclite || true'
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    ok = subprocess.run(["bash", "-c", script], cwd=RECIPE, capture_output=True, text=True,
                        env={**clean, "ESPNET_COMPRESS_VENV": str(venv)})
    assert ok.returncode == 0, ok.stderr
    assert str(REPO / "espnet_compress") in ok.stdout and "OMP=1" in ok.stdout
    if Path("/usr/lib/sctk/bin/sclite").exists():
        assert "/usr/lib/sctk/bin/sclite" in ok.stdout
    bad = subprocess.run(["bash", "-c", script], cwd=RECIPE, capture_output=True, text=True, env=clean)
    assert bad.returncode != 0 and "ESPNET_COMPRESS_VENV" in bad.stderr
    assert not (RECIPE / "path.sh").is_symlink()  # the recipe's own, not TEMPLATE's


# ------------------------------------------------------------------ packing through asr.sh's stage 14
def test_export_places_the_packed_model_where_asr_sh_decodes_and_packs_it(recipe):
    exp = recipe["qat"].root
    packed = exp / "valid.acc.best.packed.pth"
    assert is_packed(torch.load(packed, weights_only=True))
    assert packed.read_bytes() == (exp / "packed" / "model.packed.pth").read_bytes()
    assert (exp / "config.yaml").read_text() == yaml.safe_dump(
        yaml.safe_load((exp / "config.yaml").read_text()), sort_keys=False)  # training config untouched (still ours)
    record = json.loads((exp / "export.json").read_text())
    assert record["command"] == ["python", "-m", "espnet_compress.bin.export_packed", "--asr_exp", "exp/asr_qat"]
    assert record["inference_asr_model"] == "valid.acc.best.packed.pth"
    with zipfile.ZipFile(recipe["qat_zip"]) as zf:
        names = zf.namelist()
    assert "exp/asr_qat/valid.acc.best.packed.pth" in names and "exp/asr_qat/valid.acc.best.pth" not in names
    assert "exp/asr_qat/images/loss.png" in names and "exp/asr_qat/RESULTS.md" in names
    assert recipe["qat_zip"].stat().st_size < recipe["base_zip"].stat().st_size


def test_the_packed_zip_loads_and_decodes_like_the_packed_model(recipe):
    root, work = recipe["root"], recipe["root"] / "load"
    work.mkdir()
    speech = torch.randn(1, 64, FEAT_DIM, generator=torch.Generator().manual_seed(3))
    torch.save(speech, work / "speech.pt")
    (work / "load.py").write_text(LOAD_SCRIPT)
    args = {"config": "exp/asr_qat/config.yaml", "model": "exp/asr_qat/valid.acc.best.packed.pth",
            "zip": str(recipe["qat_zip"]), "cache": str(work / "zoo"), "speech": str(work / "speech.pt"),
            "result": str(work / "out.pt")}
    # one kernel for both loads, so they can be compared bit for bit ("auto" times kernels at load
    # and may pick differently for the two on a busy machine)
    proc = run_python([str(work / "load.py"), json.dumps(args)], cwd=str(root), timeout=300,
                      env={"ESPNET_COMPRESS_KERNEL": "dequant"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(work / "out.pt", weights_only=False)
    assert out["zip_model_packed"]
    assert torch.equal(out["zip_enc"], out["exp_enc"])
    assert out["zip_tokens"] == out["exp_tokens"]
    with torch.no_grad():  # and the packed model is the QAT model (4-bit weights quantized once at load)
        reference = recipe["qat"].model.encode(speech.clone(), torch.tensor([speech.shape[1]]))[0]
    torch.testing.assert_close(out["exp_enc"], reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["espnet model", "no images", "sub-path"])
def test_export_into_an_exp_dir_refuses_what_asr_sh_could_not_use(asr_task, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # the recipe dir
    model = "espnet" if case == "espnet model" else "compressed"
    exp = _asr_sh_exp(asr_task, tmp_path, "asr_x", "quantized_conformer", dict(ENCODER_CONF, quant_conf={"bits": 4}),
                      model, {"ctc_weight": 0.3}).root
    argv = ["--asr_exp", str(exp)]
    if case == "no images":
        (exp / "images" / "loss.png").unlink()
        (exp / "images").rmdir()
    if case == "sub-path":
        argv += ["--asr_model_file", "packed/valid.acc.best.pth"]
    assert export_packed.main(argv) == 2
    err = capsys.readouterr().err
    expected = {"espnet model": "model 'espnet' cannot load a packed checkpoint",
                "no images": "use_matplotlib: true", "sub-path": "give a file name inside"}[case]
    assert expected in err
    assert not (exp / "valid.acc.best.packed.pth").exists()


def test_export_system_gives_each_system_an_asr_sh_experiment_dir(asr_task, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe dir
    systems = {"full": {}, "depth2": {"blocks": [0, 1]}}
    exp = _asr_sh_exp(asr_task, tmp_path, "asr_nested", "nested_conformer", tiny_conformer_options(),
                      "compressed", {"ctc_weight": 0.3, "systems": systems}).root
    assert export_system.main(["--asr_exp", str(exp), "--system", "all"]) == 0
    out = capsys.readouterr().out
    for name in systems:
        sys_exp = exp.parent / f"asr_nested_{name}"
        assert (sys_exp / "config.yaml").is_file() and (sys_exp / "model.pth").is_file()
        assert (sys_exp / "images" / "loss.png").is_file()
        assert json.loads((sys_exp / "export.json").read_text())["system"] == name
        assert f"asr.sh: --asr_exp {sys_exp} --inference_asr_model model.pth" in out
    assert export_system.main(["--asr_exp", str(exp), "--system", "depth9"]) == 2
    assert "unknown system 'depth9'" in capsys.readouterr().err


# ------------------------------------------------------------------ decoding every system
FAKE_RECIPE = r'''
import os, sys
from pathlib import Path
args = sys.argv[2:]
tag = args[args.index("--inference_tag") + 1]
assert args[args.index("--inference_asr_model") + 1] == "valid.acc.best.pth"
out = Path(sys.argv[1]) / tag / "test"
out.mkdir(parents=True)
(out / "text").write_text("u0 " + os.environ["ESPNET_COMPRESS_SYSTEM"] + "\n")
'''


def test_decode_systems_runs_the_recipe_once_per_system_under_distinct_tags(tmp_path, capsys):
    exp = tmp_path / "exp" / "asr_nested"
    exp.mkdir(parents=True)
    (exp / "config.yaml").write_text(yaml.safe_dump({"model": "compressed", "model_conf": {
        "systems": {"full": {}, "depth3": {"blocks": [0, 1, 3]}, "int4": {"bits": 4}}}}, sort_keys=False))
    fake = tmp_path / "fake_asr.py"
    fake.write_text(FAKE_RECIPE)
    recipe_cmd = [sys.executable, str(fake), str(exp), "--stage", "12", "--stop_stage", "13"]

    assert decode_systems.main(["--asr_exp", str(exp), "--", *recipe_cmd]) == 0
    for name in ("full", "depth3", "int4"):
        decode_dir = exp / f"decode_system_{name}"
        assert (decode_dir / "test" / "text").read_text() == f"u0 {name}\n"  # the env var reached the recipe
        record = json.loads((decode_dir / "decode_systems.json").read_text())
        assert record["env"] == {"ESPNET_COMPRESS_SYSTEM": name} and record["command"][:len(recipe_cmd)] == recipe_cmd
    compare_cmd = (exp / "compare_systems.sh").read_text()
    assert compare_cmd in capsys.readouterr().out
    assert "--test_sets test --baseline full" in compare_cmd
    assert f"--system depth3 {exp}/decode_system_depth3 {exp}/valid.acc.best.pth" in compare_cmd

    for bad, message in ((["--systems", "depth9"], "unknown system(s) ['depth9']: "),
                         ([], "must not set --inference_tag")):
        extra = ["--inference_tag", "x"] if not bad else []
        with pytest.raises(SystemExit) as exc:
            decode_systems.main(["--asr_exp", str(exp), *bad, "--", *recipe_cmd, *extra])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (exp / "decode_system_depth9").exists()


def test_an_unknown_system_stops_the_model_build(asr_task, tmp_path, monkeypatch):
    exp = _write_experiment(asr_task, tmp_path / "exp", "nested_conformer", tiny_conformer_options(), "compressed",
                            {"ctc_weight": 0.3, "systems": {"full": {}, "depth2": {"blocks": [0, 1]}}})
    monkeypatch.setenv("ESPNET_COMPRESS_SYSTEM", "depth9")
    with pytest.raises(ValueError, match=r"unknown system 'depth9'; this model holds \['full', 'depth2'\]"):
        asr_task.ASRTask.build_model_from_file(exp.config, exp.checkpoint, "cpu")


# ------------------------------------------------------------------ one parameter-counting rule
def test_parameters_are_counted_by_one_rule_without_buffers(recipe):
    base, qat = recipe["base"], recipe["qat"]
    expected = sum(p.numel() for p in base.model.parameters())
    buffers = sum(b.numel() for b in base.model.buffers())
    assert buffers > 0  # BatchNorm statistics of the convolution modules: not parameters
    assert count_parameters(base.model) == expected
    assert count_file_parameters(base.checkpoint) == expected
    # the QAT model has the same parameters ("max" quantizers add none), packed or not
    assert count_file_parameters(qat.root / "valid.acc.best.packed.pth") == expected
    assert count_file_parameters(qat.checkpoint) == count_parameters(qat.model) == expected
    with pytest.raises(ParameterCountError, match="does not hold the model built from"):
        count_file_parameters(base.checkpoint, config=_other_config(recipe))
    lonely = recipe["root"] / "lonely.pth"
    lonely.write_bytes(base.checkpoint.read_bytes())
    with pytest.raises(ParameterCountError, match="no training config at"):
        count_file_parameters(lonely)


def _other_config(recipe) -> Path:
    conf = yaml.safe_load((recipe["base"].root / "config.yaml").read_text())
    conf["encoder_conf"] = dict(conf["encoder_conf"], num_blocks=3)
    path = recipe["root"] / "other.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


# ------------------------------------------------------------------ model card
def _decode_dir(exp: Path, name: str, errors: int, rtf: float) -> Path:
    """A decode dir as asr.sh stage 12 writes it: hypotheses and calculate_rtf.log."""
    test = exp / name / "test"
    (test / "logdir").mkdir(parents=True)
    (test / "text").write_text("".join(f"{u} {'B' if i < errors else 'A'} A\n" for i, u in enumerate(TEST_UTTS)))
    (test / "logdir" / "calculate_rtf.log").write_text(
        f"# pyscripts/utils/calculate_rtf.py ...\nTotal audio duration: 12.000 [sec]\n"
        f"Total decoding time: {12 * rtf:.3f} [sec]\nRTF: {rtf:.3f}\nLatency: 50.000 [ms/sentence]\n")
    (exp / name / "run.sh").write_text(f'./asr.sh --asr_exp {exp.name} --stage 12 "$@"; exit $?\n')
    return exp / name


@needs_sctk
def test_model_card_states_the_numbers_of_the_report(recipe, capsys):
    root = recipe["root"]
    (root / "data" / "test").mkdir(parents=True)
    (root / "data" / "test" / "text").write_text("".join(f"{u} A A\n" for u in TEST_UTTS))
    base_dec = _decode_dir(recipe["base"].root, "decode_fp32", 0, 0.25)
    qat_dec = _decode_dir(recipe["qat"].root, "decode_packed", 2, 0.125)
    compare_dir = root / "exp" / "compare"
    argv = ["--ref_dir", str(root / "data"), "--test_sets", "test", "--baseline", "fp32",
            "--system", "fp32", str(base_dec), str(recipe["base"].checkpoint),
            "--system", "int4", str(qat_dec), str(recipe["qat"].root / "valid.acc.best.packed.pth"),
            "--out_dir", str(compare_dir)]
    assert compare_main(argv) == 0
    capsys.readouterr()
    report = json.loads((compare_dir / "compare.json").read_text())
    report_md = (compare_dir / "compare.md").read_text()
    rows = {r["name"]: r for r in report["systems"]}

    assert model_card.main(["--compare_dir", str(compare_dir), "--system", "int4", "--zip", str(recipe["qat_zip"])]) == 0
    card = card_path(recipe["qat_zip"]).read_text()
    q, b = rows["int4"], rows["fp32"]
    cell = q["test_sets"]["test"]
    wer = cell["wer"]
    assert wer["wer"] == pytest.approx(100 * 2 / 24) and cell["speed"]["rtf"] == 0.125
    assert (f"| test | {wer['wer']:.2f} | {wer['num_words']:,} | {wer['substitutions']}/{wer['deletions']}/"
            f"{wer['insertions']} | {cell['verdict']} | 0.125 |") in card
    assert f"| {wer['wer']:.2f} | {cell['verdict']} |" in report_md  # the report shows the same cell
    assert f"| parameters | {q['num_params']:,} | {b['num_params']:,} |" in card
    assert q["num_params"] == count_parameters(recipe["qat"].model)
    assert f"| checkpoint bytes | {q['checkpoint_bytes']:,} | {b['checkpoint_bytes']:,} |" in card
    assert q["checkpoint_bytes"] == (recipe["qat"].root / "valid.acc.best.packed.pth").stat().st_size
    assert f"| zip bytes (this file's archive) | {recipe['qat_zip'].stat().st_size:,} |" in card
    assert "| int4 | 0.125 |" in report_md
    assert "bits: 4" in card and "encoder: quantized_conformer" in card  # system spec, training config
    commands = re.findall(r"```bash\n(.*?)\n```", card, flags=re.S)
    assert commands[0] == "./asr.sh --asr_config conf/asr_qat.yaml"  # asr.sh's record of the training
    assert commands[1] == "python -m espnet_compress.bin.export_packed --asr_exp exp/asr_qat"
    assert commands[2] == "./asr.sh --asr_exp asr_qat"  # asr.sh's record of the decoding
    assert commands[3] == (compare_dir / "command.sh").read_text().strip()
    assert commands[4].startswith("python -m espnet_compress.bin.model_card --compare_dir")

    # a zip holding another checkpoint than the one the report scored is refused
    assert model_card.main(["--compare_dir", str(compare_dir), "--system", "int4", "--zip", str(recipe["base_zip"]),
                            "--out", str(root / "wrong.md")]) == 2
    assert "not the checkpoint compare.json scored for 'int4'" in capsys.readouterr().err
    assert not (root / "wrong.md").exists()
