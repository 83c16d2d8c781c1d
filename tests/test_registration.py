"""Our names work in ESPnet's stock programs without any edit to ESPnet (import hook + registry)."""
from __future__ import annotations

import argparse

import pytest
import yaml

from tests.conftest import run_python


def test_print_config_lists_elastic_encoder_options():
    proc = run_python(["-m", "espnet2.bin.asr_train", "--print_config", "--encoder", "elastic_conformer"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    conf = yaml.safe_load(proc.stdout)
    assert conf["encoder"] == "elastic_conformer"
    # ESPnet's Conformer options are listed with their defaults, plus our plan.
    assert conf["encoder_conf"]["plan"] is None
    assert conf["encoder_conf"]["quant_conf"] is None and conf["encoder_conf"]["fold"] is None  # features, off
    assert conf["encoder_conf"]["num_blocks"] == 6 and conf["encoder_conf"]["linear_units"] == 2048


def test_inference_program_knows_the_encoder():
    proc = run_python(["-c", "import espnet2.bin.asr_inference, espnet2.tasks.asr as a; "
                             "print(a.encoder_choices.classes['elastic_conformer'].__name__)"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "ElasticConformerEncoder"


def test_without_hook_the_name_is_unknown_and_register_adds_it():
    env = {"ESPNET_COMPRESS_NO_HOOK": "1"}
    proc = run_python(["-m", "espnet2.bin.asr_train", "--print_config", "--encoder", "elastic_conformer"], env=env)
    assert proc.returncode != 0 and "elastic_conformer" in proc.stderr
    proc = run_python(["-c", "import espnet_compress; espnet_compress.register(); import espnet2.tasks.asr as a; "
                             "print('elastic_conformer' in a.encoder_choices.classes)"], env=env)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "True", proc.stderr[-2000:]


def test_plugin_import_does_not_import_torch_at_startup():
    proc = run_python(["-c", "import sys; print('torch' in sys.modules, any(type(f).__name__ == '_AsrTaskFinder' "
                             "for f in sys.meta_path))"])
    assert proc.stdout.split() == ["False", "True"]


def _build_args(asr_task, tmp_path, encoder_conf):
    token_list = tmp_path / "tokens.txt"
    token_list.write_text("<blank>\n<unk>\nA\nB\n<sos/eos>\n")
    parser = asr_task.ASRTask.get_parser()
    args = parser.parse_args(["--token_list", str(token_list), "--encoder", "elastic_conformer",
                              "--input_size", "20", "--output_dir", str(tmp_path)])
    args.encoder_conf = encoder_conf
    args.frontend = None
    args.normalize = None
    args.specaug = None
    args.decoder = "transformer"
    args.decoder_conf = {"num_blocks": 1, "linear_units": 16, "attention_heads": 2}
    return args


def test_build_model_through_asr_task(asr_task, tmp_path):
    args = _build_args(asr_task, tmp_path, {"output_size": 16, "attention_heads": 2, "linear_units": 24,
                                            "num_blocks": 2, "plan": {"blocks": [1]}})
    model = asr_task.ASRTask.build_model(args)
    assert type(model.encoder).__name__ == "ElasticConformerEncoder"
    assert model.encoder.plan.blocks == (1,)


def test_unknown_encoder_option_rejected_at_build_time(asr_task, tmp_path):
    args = _build_args(asr_task, tmp_path, {"output_size": 16, "num_blockz": 2})
    with pytest.raises(TypeError, match="num_blockz"):
        asr_task.ASRTask.build_model(args)
    assert isinstance(args, argparse.Namespace)
