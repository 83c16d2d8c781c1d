"""Packed export: stock ESPnet inference loads it and computes what the QAT model computed.

The inference checks run stock ``Speech2Text`` in one fresh interpreter (importing ESPnet costs
~15 s, so one process does them all): started without the plugin (``ESPNET_COMPRESS_NO_HOOK=1``) it
first shows that plain ESPnet refuses the export, then registers the plugin as a user of a source
tree would (``espnet_compress.register()``) and loads the export, the QAT original and the zip.
"""
from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pytest
import torch
import yaml

from espnet_compress.bin.export_packed import main as export_main
from espnet_compress.export import ExportError, ExportResult, export_packed
from espnet_compress.quant.api import quantized_modules
from tests.conftest import run_python, tiny_conformer_options
from tests.test_packing import flip_blob_byte

FEAT_DIM = 20
ENCODER_CONF = tiny_conformer_options(output_size=64, linear_units=64, num_blocks=2)

#: Runs in a fresh interpreter started without the plugin hook; saves what it saw to a .pt file.
INFERENCE_SCRIPT = r'''
import json, sys
import torch
from espnet2.bin.asr_inference import Speech2Text
from espnet_model_zoo.downloader import ModelDownloader

a = json.loads(sys.argv[1])
speech = torch.load(a["speech"])
kw = dict(device="cpu", beam_size=2, ctc_weight=0.3, nbest=1, maxlenratio=0.0)
out = {}
try:
    Speech2Text(asr_train_config=a["config"], asr_model_file=a["packed"], **kw)
    out["no_plugin_error"] = None
except Exception as err:
    out["no_plugin_error"] = f"{type(err).__name__}: {err}"

import espnet_compress
espnet_compress.register()

def run(s2t):  # clones: ESPnet's global_mvn normalizes its input in place
    with torch.no_grad():
        enc, _ = s2t.asr_model.encode(speech.clone(), torch.tensor([speech.shape[1]]))
        return enc, s2t(speech[0].clone())[0][2]

packed = Speech2Text(asr_train_config=a["config"], asr_model_file=a["packed"], **kw)
out["packed_enc"], out["packed_tokens"] = run(packed)
out["paths"] = sorted(set(packed.asr_model.inference_paths.values()))
out["quantized_left"] = sum(hasattr(m, "weight_quantizer") for m in packed.asr_model.modules())
out["qat_enc"], out["qat_tokens"] = run(Speech2Text(asr_train_config=a["qat_config"], asr_model_file=a["qat_model"], **kw))
out["zip_info"] = ModelDownloader(a["cache"]).download_and_unpack(a["zip"])  # what from_pretrained does
out["zip_enc"], out["zip_tokens"] = run(Speech2Text(**out["zip_info"], **kw))
try:
    Speech2Text(asr_train_config=a["config"], asr_model_file=a["corrupt"], **kw)
    out["corrupt_error"] = None
except Exception as err:
    out["corrupt_error"] = f"{type(err).__name__}: {err}"
torch.save(out, a["result"])
'''


def _write_experiment(asr_task, root: Path, encoder: str, encoder_conf: Dict[str, Any], model: str,
                      model_conf: Dict[str, Any]) -> argparse.Namespace:
    """What ``asr_train`` leaves in an experiment directory: config.yaml (token list inlined, paths
    to the feature statistics) and a checkpoint, plus the built model itself."""
    root.mkdir(parents=True)
    token_list = root / "tokens.txt"
    token_list.write_text("<blank>\n<unk>\nA\nB\n<sos/eos>\n")
    stats = root / "asr_stats" / "feats_stats.npz"
    stats.parent.mkdir()
    rng = np.random.default_rng(0)
    mean, var = rng.normal(size=FEAT_DIM), rng.uniform(0.5, 2.0, size=FEAT_DIM)
    np.savez(stats, count=np.array(100), sum=100 * mean, sum_square=100 * (var + mean ** 2))
    parser = asr_task.ASRTask.get_parser()
    args = parser.parse_args(["--token_list", str(token_list), "--token_type", "word", "--input_size", str(FEAT_DIM),
                              "--encoder", encoder, "--decoder", "transformer", "--model", model,
                              "--output_dir", str(root)])
    args.encoder_conf = encoder_conf
    args.decoder_conf = {"num_blocks": 1, "linear_units": 64, "attention_heads": 2}
    args.model_conf = model_conf
    args.frontend = None
    args.specaug = None
    args.normalize = "global_mvn"
    args.normalize_conf = {"stats_file": str(stats)}
    torch.manual_seed(0)
    built = asr_task.ASRTask.build_model(args).eval()
    config, checkpoint = root / "config.yaml", root / "valid.acc.best.pth"
    config.write_text(yaml.safe_dump(vars(args), sort_keys=False))
    torch.save(built.state_dict(), checkpoint)
    return argparse.Namespace(config=config, checkpoint=checkpoint, model=built, root=root)


def _encode(model: torch.nn.Module, speech: torch.Tensor) -> torch.Tensor:
    """Encoder output; on a copy because ESPnet's global_mvn normalizes its input in place."""
    with torch.no_grad():
        return model.encode(speech.clone(), torch.tensor([speech.shape[1]]))[0]


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    return torch.randn(1, 64, FEAT_DIM, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def qat(asr_task, tmp_path_factory) -> argparse.Namespace:
    """A ``compressed`` model: 4-bit quantized_conformer encoder and 4-bit decoder."""
    conf = dict(ENCODER_CONF, quant_conf={"bits": 4})
    return _write_experiment(asr_task, tmp_path_factory.mktemp("exp") / "asr_qat", "quantized_conformer", conf,
                             "compressed", {"ctc_weight": 0.3, "decoder_quant": {"bits": 4}})


@pytest.fixture(scope="module")
def exported(qat) -> ExportResult:
    return export_packed(qat.config, qat.checkpoint, qat.root / "packed")


@pytest.fixture(scope="module")
def inference(qat, exported, speech) -> Dict[str, Any]:
    """Results of :data:`INFERENCE_SCRIPT` on the export (and a corrupted copy of it)."""
    work = exported.out_dir.parent / "inference"
    work.mkdir()
    torch.save(speech, work / "speech.pt")
    flip_blob_byte(exported.packed_file, work / "corrupt.pth")
    script = work / "load.py"
    script.write_text(INFERENCE_SCRIPT)
    args = {"config": str(exported.config_file), "packed": str(exported.packed_file), "qat_config": str(qat.config),
            "qat_model": str(qat.checkpoint), "zip": str(exported.archive), "cache": str(work / "zoo"),
            "corrupt": str(work / "corrupt.pth"), "speech": str(work / "speech.pt"), "result": str(work / "out.pt")}
    proc = run_python([str(script), json.dumps(args)], env={"ESPNET_COMPRESS_NO_HOOK": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(torch.load(work / "out.pt", weights_only=False), cache=work / "zoo")


def test_export_writes_deployable_files_and_size_report(qat, exported):
    for path in (exported.packed_file, exported.config_file, exported.size_report_json, exported.size_report_md,
                 exported.archive):
        assert path.is_file(), path
    assert not [p.name for p in exported.out_dir.parent.iterdir() if p.name.startswith(".packed.")]  # no staging left
    conf = yaml.safe_load(exported.config_file.read_text())
    assert conf["model"] == "compressed"
    stats = Path(conf["normalize_conf"]["stats_file"])
    assert stats.parent == exported.out_dir and stats.is_file()  # copied next to the model

    report = json.loads(exported.size_report_json.read_text())
    assert report == exported.report
    assert report["source_checkpoint_bytes"] == qat.checkpoint.stat().st_size
    assert report["packed_file_bytes"] == exported.packed_file.stat().st_size
    assert report["ratio_overall"] > 2.5  # norms, embeddings, CTC and conv2d front end stay fp32
    qw = report["quantized_weights"]
    n_quant = sum(m.weight.numel() for m in quantized_modules(qat.model).values())
    assert qw["params"] == n_quant and qw["fp32_bytes"] == 4 * n_quant
    assert qw["ratio"] >= 7.5  # 32 / 4 bits, minus one fp32 scale per tensor
    assert list(report["bits_histogram"]) == ["4"]
    assert report["bits_histogram"]["4"]["tensors"] == len(quantized_modules(qat.model))
    assert {"encoder quantized weights", "decoder quantized weights"} <= set(report["groups"])
    assert sum(report["groups"].values()) == report["blob_bytes"]
    assert f"{qw['ratio']:.2f}x" in exported.size_report_md.read_text()

    with zipfile.ZipFile(exported.archive) as zf:
        names = set(zf.namelist())
        meta = yaml.safe_load(zf.read("meta.yaml"))
    assert meta["files"] == {"asr_model_file": "packed/model.packed.pth"}
    assert meta["yaml_files"] == {"asr_train_config": "packed/config.yaml"}
    assert {"packed/model.packed.pth", "packed/config.yaml", "packed/feats_stats.npz", "packed/size_report.md"} <= names


def test_stock_speech2text_computes_what_the_qat_model_computed(qat, speech, inference):
    out = inference
    reference = _encode(qat.model, speech)
    torch.testing.assert_close(out["qat_enc"], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["packed_enc"], reference, atol=1e-4, rtol=0)
    assert out["packed_tokens"] == out["qat_tokens"]
    assert out["quantized_left"] == 0 and out["paths"]  # frozen into inference kernels at load


def test_model_zoo_archive_unpacks_self_contained(speech, qat, inference):
    out = inference
    torch.testing.assert_close(out["zip_enc"], _encode(qat.model, speech), atol=1e-4, rtol=0)
    assert out["zip_tokens"] == out["qat_tokens"]
    cache = inference["cache"].resolve()
    conf = yaml.safe_load(Path(out["zip_info"]["asr_train_config"]).read_text())
    assert Path(out["zip_info"]["asr_model_file"]).resolve().is_relative_to(cache)
    assert Path(conf["normalize_conf"]["stats_file"]).resolve().is_relative_to(cache)


def test_corrupted_packed_file_fails_in_speech2text_with_checksum_message(inference):
    error: Optional[str] = inference["corrupt_error"]
    assert error is not None and "PackedModelError" in error and "checksum mismatch" in error


def test_without_the_plugin_the_export_fails_naming_the_unknown_class(inference):
    error: Optional[str] = inference["no_plugin_error"]
    assert error is not None and ("quantized_conformer" in error or "compressed" in error), error


def test_cli_exports_an_espnet_model_as_compressed(asr_task, tmp_path, speech, capsys):
    """A QAT encoder trained under the stock ``espnet`` model class: the export switches the config
    to ``compressed`` so that ESPnet's own loader expands the packed file."""
    exp = _write_experiment(asr_task, tmp_path / "asr_espnet", "quantized_conformer",
                            dict(ENCODER_CONF, quant_conf={"bits": {"*.conv_module.*": 8, "*": 4}}), "espnet",
                            {"ctc_weight": 0.3})
    out_dir = tmp_path / "asr_espnet" / "packed"
    rc = export_main(["--asr_train_config", str(exp.config), "--asr_model_file", str(exp.checkpoint),
                      "--out_dir", str(out_dir), "--scale_dtype", "float16", "--log_level", "WARNING"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| 8 |" in printed and "| 4 |" in printed  # bits histogram
    assert yaml.safe_load((out_dir / "config.yaml").read_text())["model"] == "compressed"
    loaded, _ = asr_task.ASRTask.build_model_from_file(out_dir / "config.yaml", out_dir / "model.packed.pth", "cpu")
    assert type(loaded).__name__ == "CompressedASRModel" and not quantized_modules(loaded)
    # fp16 scales: a few ulps of the step away from the QAT weights, nothing more
    torch.testing.assert_close(_encode(loaded.eval(), speech), _encode(exp.model, speech), atol=5e-3, rtol=0)


def test_export_refuses_unsuitable_inputs(asr_task, tmp_path, qat, exported, capsys):
    plain = _write_experiment(asr_task, tmp_path / "asr_fp32", "elastic_conformer", dict(ENCODER_CONF), "espnet",
                              {"ctc_weight": 0.3})
    with pytest.raises(ExportError, match="no quantized layer"):
        export_packed(plain.config, plain.checkpoint, tmp_path / "out")

    other = tmp_path / "maskctc.yaml"
    other.write_text(yaml.safe_dump(dict(yaml.safe_load(qat.config.read_text()), model="maskctc")))
    with pytest.raises(ExportError, match=r"model 'maskctc' cannot load packed checkpoints"):
        export_packed(other, qat.checkpoint, tmp_path / "out")

    with pytest.raises(ExportError, match="already a packed checkpoint"):
        export_packed(qat.config, exported.packed_file, tmp_path / "out")
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in qat.model.state_dict().items() if not k.startswith("decoder.")}, partial)
    with pytest.raises(ExportError, match=r"does not match the model built from .*missing entries, e.g. \['decoder"):
        export_packed(qat.config, partial, tmp_path / "out")
    with pytest.raises(ExportError, match="scale_dtype"):
        export_packed(qat.config, qat.checkpoint, tmp_path / "out", scale_dtype="int8")

    rc = export_main(["--asr_train_config", str(qat.config), "--asr_model_file", str(tmp_path / "nope.pth"),
                      "--out_dir", str(tmp_path / "out")])
    assert rc == 2
    assert f"asr_model_file {tmp_path / 'nope.pth'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
