"""Each system of a multi-system model exports as a standalone model with the same outputs."""
from __future__ import annotations

import pytest
import torch
import yaml

from espnet_compress.export.system_export import export_system
from tests.conftest import run_python
from tests.test_nested import ENC, SYSTEMS, batch, build

pytestmark = pytest.mark.slow


def save_trained(asr_task, tmp, encoder: str, enc: dict, lr: float = 0.01, **model_conf):
    """Build a ``compressed`` model, take one SGD step and save it like ESPnet's exp dir
    (``config.yaml`` holding exactly the options it was built with, ``model.pth``)."""
    from tests.test_registration import _build_args

    model_conf = {"ctc_weight": 0.3, "decoder_quant": {"bits": 0, "bit_choices": [4, 8]}, **model_conf}
    model = build(asr_task, tmp, encoder=encoder, enc=dict(enc), **model_conf)
    model.train()
    loss, _, _ = model(**batch())
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    model.eval()
    args = _build_args(asr_task, tmp, dict(enc))
    args.encoder, args.model, args.model_conf = encoder, "compressed", model_conf
    (tmp / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))
    torch.save(model.state_dict(), tmp / "model.pth")
    return model


@pytest.fixture(scope="module")
def trained(asr_task, tmp_path_factory):
    """A multi-system model after one optimizer step, saved like ESPnet's exp dir."""
    tmp = tmp_path_factory.mktemp("sys")
    systems = dict(SYSTEMS, mixed={"blocks": [0, 0, 2], "ffn_units": [48, 24, 24]}, tail={"blocks": [1, 2], "ffn_units": 24},
                   mixed4={"blocks": [0, 2], "ffn_units": [48, 24], "bits": 4, "decoder_bits": 4},
                   twice4={"blocks": [0, 0], "ffn_units": [48, 24], "bits": 4})
    return save_trained(asr_task, tmp, "quantized_conformer", ENC, systems=systems), tmp


def _encode(model, name=None):
    b = batch()
    ctx = model.system(name) if name else torch.no_grad()
    with torch.no_grad(), ctx:
        out, _ = model.encode(b["speech"], b["speech_lengths"])
    return out


@pytest.mark.parametrize("system,stock", [("shallow", True), ("narrow", True), ("tail", True),
                                          ("mixed", False), ("int4", False)])
def test_export_matches_system_in_supernet(trained, tmp_path, system, stock):
    model, tmp = trained
    result = export_system(tmp / "config.yaml", tmp / "model.pth", system, tmp_path / system)
    assert result.stock == stock
    from espnet2.tasks.asr import ASRTask

    standalone, _ = ASRTask.build_model_from_file(result.config, result.model_file, "cpu")
    standalone.eval()
    torch.testing.assert_close(_encode(standalone), _encode(model, system), rtol=1e-4, atol=1e-5)
    if stock:
        conf = yaml.safe_load(result.config.read_text())
        assert conf["encoder"] == "conformer" and conf["model"] == "espnet"


def test_stock_export_loads_without_plugin(trained, tmp_path):
    model, tmp = trained
    result = export_system(tmp / "config.yaml", tmp / "model.pth", "shallow", tmp_path / "shallow")
    expected = _encode(model, "shallow")
    torch.save(batch(), tmp_path / "batch.pt")
    script = (
        "import sys, torch\n"
        "from espnet2.tasks.asr import ASRTask\n"
        "import espnet2.tasks.asr as a\n"
        "assert 'elastic_conformer' not in a.encoder_choices.classes\n"
        f"m, _ = ASRTask.build_model_from_file({str(result.config)!r}, {str(result.model_file)!r}, 'cpu')\n"
        "m.eval()\n"
        f"b = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n"
        "    out, _ = m.encode(b['speech'], b['speech_lengths'])\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
        "print(type(m).__name__, type(m.encoder).__name__)\n"
    )
    proc = run_python(["-c", script], env={"ESPNET_COMPRESS_NO_HOOK": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].split() == ["ESPnetASRModel", "ConformerEncoder"]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-4, atol=1e-5)


def test_export_rejects_unknown_system(trained, tmp_path):
    _, tmp = trained
    with pytest.raises(ValueError, match="unknown system 'huge'"):
        export_system(tmp / "config.yaml", tmp / "model.pth", "huge", tmp_path / "x")


@pytest.fixture(scope="module")
def foldable(asr_task, tmp_path_factory):
    """A jointly trained (one step) 2-block foldable seed, saved like ESPnet's exp dir."""
    from tests.test_foldable import FOLD_ENC

    tmp = tmp_path_factory.mktemp("fold")
    systems = {"unfolded": {"depth": 4}, "seed": {"depth": 2, "weight": 0.25}}
    return save_trained(asr_task, tmp, "foldable_conformer", FOLD_ENC, systems=systems, decoder_quant=None), tmp


def test_foldable_seed_exports_at_any_depth_and_path(foldable, tmp_path):
    """Depth 3 by the second path (0 0 1) keeps the 2 physical blocks and bakes the path in;
    the seed at its own depth is a plain 2-block Conformer that needs no plugin."""
    model, tmp = foldable
    from espnet2.tasks.asr import ASRTask

    deep = export_system(tmp / "config.yaml", tmp / "model.pth", None, tmp_path / "d3",
                         plan={"depth": 3, "path_index": 1})
    assert not deep.stock and not deep.packed
    conf = yaml.safe_load(deep.config.read_text())
    assert conf["encoder_conf"]["num_blocks"] == 2 and conf["encoder_conf"]["plan"] == {"name": "plan", "blocks": [0, 0, 1]}
    assert "fold" not in conf["encoder_conf"]
    standalone, _ = ASRTask.build_model_from_file(deep.config, deep.model_file, "cpu")
    standalone.eval()
    with model.encoder.using({"depth": 3, "path_index": 1}):
        expected = _encode(model)
    torch.testing.assert_close(_encode(standalone), expected, rtol=1e-4, atol=1e-5)
    assert deep.num_params == sum(p.numel() for p in model.parameters())  # unfolding adds no weights

    seed = export_system(tmp / "config.yaml", tmp / "model.pth", None, tmp_path / "d2", plan={"depth": 2})
    assert seed.stock


def test_export_of_an_impossible_plan_names_the_problem(foldable, tmp_path):
    from espnet_compress.core.plan import PlanError

    _, tmp = foldable
    with pytest.raises(PlanError, match="depth 1 is below the 2 physical blocks"):
        export_system(tmp / "config.yaml", tmp / "model.pth", None, tmp_path / "x", plan={"depth": 1})
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="exactly one of a system name or a plan"):
        export_system(tmp / "config.yaml", tmp / "model.pth", "seed", tmp_path / "x", plan={"depth": 2})


@pytest.mark.parametrize("kernel", ["dequant", "int8", "int4", "auto"])
def test_quantized_system_with_per_step_widths_exports_exactly(trained, tmp_path, monkeypatch, kernel):
    """Block 2 runs at width 24 of 48 at 4 bits: the packed file holds the codes of that slice
    (what the supernet computed), not a re-quantized slice of the stored 48-wide block; every
    inference kernel computes with them (int8/int4 weight-only kernels take fp activations, so
    they match up to float summation order)."""
    model, tmp = trained
    result = export_system(tmp / "config.yaml", tmp / "model.pth", "mixed4", tmp_path / "mixed4")
    assert result.packed and not result.stock
    from espnet2.tasks.asr import ASRTask

    monkeypatch.setenv("ESPNET_COMPRESS_KERNEL", kernel)
    standalone, _ = ASRTask.build_model_from_file(result.config, result.model_file, "cpu")
    standalone.eval()
    torch.testing.assert_close(_encode(standalone), _encode(model, "mixed4"), rtol=0, atol=2e-5)


def test_a_quantized_block_at_two_widths_is_refused_by_name(trained, tmp_path):
    _, tmp = trained
    with pytest.raises(ValueError, match=r"system 'twice4': block 0 runs at FFN widths \[24, 48\] with 4-bit "
                                         r"max-scale weights"):
        export_system(tmp / "config.yaml", tmp / "model.pth", "twice4", tmp_path / "twice4")
    assert not (tmp_path / "twice4").exists()  # refused before anything is written
