"""Features compose in one encoder: a foldable seed, quantized, trained as nested systems; the old
encoder names are aliases of the one host class; environment variables follow one set of rules."""
from __future__ import annotations

import pytest
import torch
import yaml
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_compress.core.plan import PlanError
from espnet_compress.encoders.aliases import FoldableConformerEncoder, NestedConformerEncoder, QuantizedConformerEncoder
from espnet_compress.encoders.elastic_conformer import ElasticConformerEncoder
from espnet_compress.env import EnvVarError
from espnet_compress.export.system_export import export_system
from espnet_compress.models.systems import SystemSpecError
from espnet_compress.quant.quantizers import MaxScaleQuantizer
from tests.conftest import tiny_conformer_options
from tests.test_nested import batch, build
from tests.test_system_export import save_trained

#: a 2-block seed unfolded to depth 4, every weight quantizable at 4 bits
SEED = dict(tiny_conformer_options(num_blocks=2), fold={"depth": 4}, quant_conf={"bits": 0, "bit_choices": [4]})
SYSTEMS = {"deep": {"depth": 4}, "deep4": {"depth": 4, "bits": 4, "decoder_bits": 4},
           "seed4": {"depth": 2, "bits": 4, "decoder_bits": 4}}


@pytest.fixture(scope="module")
def composed(asr_task, tmp_path_factory):
    """The composed model after one SGD step, saved like an ESPnet exp dir."""
    tmp = tmp_path_factory.mktemp("composed")
    model = save_trained(asr_task, tmp, "elastic_conformer", SEED, lr=0.05, systems=SYSTEMS,
                         decoder_quant={"bits": 0, "bit_choices": [4]})
    return model, tmp


def _encode(model, system=None):
    b = batch()
    with torch.no_grad(), (model.system(system) if system else torch.no_grad()):
        return model.encode(b["speech"], b["speech_lengths"])[0]


def test_unfolded_quantized_system_equals_an_explicit_model(composed):
    """'deep4' = the seed's blocks at path (0, 0, 1, 1), every Linear/Conv1d 4-bit: a stock
    4-block Conformer with those blocks copied, weights fake-quantized by hand and each use's
    own norm statistics gives the same encoder output."""
    model, _ = composed
    enc = model.encoder
    with model.system("deep4"):
        path = enc.plan.blocks
        assert path == (0, 0, 1, 1)
        got = enc(batch()["speech"], batch()["speech_lengths"])[0]
    explicit = ConformerEncoder(20, **tiny_conformer_options(num_blocks=4)).eval()
    src, dst = enc.state_dict(), explicit.state_dict()
    uses = {}
    for step, block in enumerate(path):
        use = uses.get(block, 0)
        uses[block] = use + 1
        slot = enc.blocks.stats_slot(model.systems["deep4"].plan, block, use)
        for key in [k for k in dst if k.startswith(f"encoders.{step}.")]:
            rest = key.split(".", 2)[2]
            if slot is not None and rest.startswith("conv_module.norm.running") or (
                    slot is not None and rest == "conv_module.norm.num_batches_tracked"):
                dst[key] = src[f"encoders.{block}.conv_module.norm.system_stats.{slot}.{rest.split('.')[-1]}"]
            else:
                dst[key] = src[f"encoders.{block}.{rest}"]
    for key in dst:
        if not key.startswith("encoders."):
            dst[key] = src[key]
    explicit.load_state_dict(dst)
    quantizer = MaxScaleQuantizer()
    for module in explicit.modules():
        if type(module) in (torch.nn.Linear, torch.nn.Conv1d):
            codes, scale = quantizer.encode(module.weight, 4)
            module.weight.data = quantizer.decode(codes, scale, module.weight)
    want = explicit(batch()["speech"], batch()["speech_lengths"])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("system", ["deep4", "seed4"])
def test_composed_systems_export_and_decode_like_the_supernet(composed, tmp_path, system):
    model, tmp = composed
    result = export_system(tmp / "config.yaml", tmp / "model.pth", system, tmp_path / system)
    assert result.packed and not result.stock
    conf = yaml.safe_load(result.config.read_text())
    assert conf["encoder"] == "elastic_conformer" and "fold" not in conf["encoder_conf"]
    from espnet2.tasks.asr import ASRTask

    standalone, _ = ASRTask.build_model_from_file(result.config, result.model_file, "cpu")
    standalone.eval()
    torch.testing.assert_close(_encode(standalone), _encode(model, system), rtol=0, atol=2e-5)


def test_old_names_build_the_same_modules_as_the_host_with_features():
    opts = tiny_conformer_options()
    pairs = [(QuantizedConformerEncoder(20, **opts), ElasticConformerEncoder(20, quant_conf={}, **opts)),
             (NestedConformerEncoder(20, **opts), ElasticConformerEncoder(20, quant_conf={"bits": 0}, **opts)),
             (FoldableConformerEncoder(20, fold={"depth": 5}, **opts), ElasticConformerEncoder(20, fold={"depth": 5}, **opts))]
    for alias, host in pairs:
        assert isinstance(alias, ElasticConformerEncoder)
        assert list(alias.state_dict()) == list(host.state_dict())
        assert alias.plan == host.plan
        assert {n: type(m) for n, m in alias.named_modules() if n} == {n: type(m) for n, m in host.named_modules() if n}
    nested = NestedConformerEncoder(20, quant_conf={"method": "lsq"}, **opts)
    assert nested.quant_config.bits == (("*", 0),) and nested.quant_config.method == "lsq"  # merged


@pytest.mark.parametrize("enc,systems,needle", [
    (dict(SEED), {"a": {"ffn_units": 96}}, "model_conf.systems.a: plan 'a': ffn_units 96 is outside 1..48"),
    (dict(SEED), {"a": {"depth": 1}}, "model_conf.systems.a: plan 'a': depth 1 is below the 2 physical blocks"),
    (dict(SEED), {"a": {"bits": {"encoders.7.*": 4}}}, "bits['encoders.7.*'] matches no quantized module"),
    ({k: v for k, v in SEED.items() if k != "quant_conf"}, {"a": {"bits": 4}},
     "switch the quantization feature on (encoder_conf.quant_conf)"),
    ({k: v for k, v in SEED.items() if k != "fold"}, {"a": {"depth": 4}},
     "['depth'] need the 'fold' feature (encoder_conf.fold)"),
])
def test_features_that_cannot_combine_fail_at_build_time_with_the_yaml_path(asr_task, tmp_path, enc, systems, needle):
    with pytest.raises(SystemSpecError) as err:
        build(asr_task, tmp_path, encoder="elastic_conformer", enc=enc, systems=systems, decoder_quant=None)
    assert needle in str(err.value)


def test_a_fold_depth_below_the_seed_names_the_option():
    with pytest.raises(ValueError, match=r"encoder_conf.fold.depth: depth 1 is below the 3 physical blocks"):
        ElasticConformerEncoder(20, fold={"depth": 1}, **tiny_conformer_options())


# ---------------------------------------------------------------------------------- environment
def test_training_refuses_a_decode_only_variable(asr_task, tmp_path, monkeypatch):
    monkeypatch.setenv("ESPNET_COMPRESS_SYSTEM", "seed4")
    model = build(asr_task, tmp_path, encoder="elastic_conformer", enc=dict(SEED), systems=SYSTEMS,
                  decoder_quant={"bits": 0, "bit_choices": [4]})
    assert model.active_system == "seed4"  # decoding follows it
    model.eval()
    with torch.no_grad():
        model(**batch())
    model.train()
    with pytest.raises(EnvVarError, match="ESPNET_COMPRESS_SYSTEM=seed4 is set while training"):
        model(**batch())


def test_a_plan_from_the_environment_is_refused_in_training_of_a_single_system(monkeypatch):
    monkeypatch.setenv("ESPNET_COMPRESS_PLAN", '{"blocks": [0, 2]}')
    enc = ElasticConformerEncoder(20, **tiny_conformer_options())
    assert enc.plan.blocks == (0, 2)
    x, lens = torch.randn(2, 40, 20), torch.tensor([40, 30])
    enc.eval()(x, lens)
    with pytest.raises(EnvVarError, match="ESPNET_COMPRESS_PLAN=.* is set while training"):
        enc.train()(x, lens)


def test_active_variables_are_logged(monkeypatch, caplog):
    from espnet_compress import env

    monkeypatch.setenv("ESPNET_COMPRESS_KERNEL", "dequant")
    monkeypatch.setattr(env, "_logged", {})
    with caplog.at_level("INFO", logger="espnet_compress.env"):
        assert env.settings().kernel == "dequant"
    assert "ESPNET_COMPRESS_KERNEL=dequant is active" in caplog.text


def test_the_composed_model_lists_its_features_and_checks_paths(composed):
    model, _ = composed
    assert set(model.encoder.features) == {"quant_conf", "fold"}
    with pytest.raises(PlanError, match=r"path_index 9 is out of range: depth 4 has 1 paths"):
        model.encoder.set_plan({"depth": 4, "path_index": 9})


def test_a_system_variable_on_a_single_system_model_is_an_error(asr_task, tmp_path, monkeypatch):
    monkeypatch.setenv("ESPNET_COMPRESS_SYSTEM", "depth9")
    with pytest.raises(SystemSpecError, match="ESPNET_COMPRESS_SYSTEM=depth9 is set but this model declares no "
                                              "model_conf.systems"):
        build(asr_task, tmp_path, encoder="elastic_conformer", enc=tiny_conformer_options(), systems=None,
              decoder_quant=None)


def test_front_end_embedding_and_ctc_follow_each_system_and_export(asr_task, tmp_path):
    """With the Conv2d subsampling, the token embedding and the CTC projection quantizable too
    (what takes the composed depth-4 4-bit system past 10x), each system quantizes them at its own
    bits -- the fp32 teacher keeps them fp32 -- and the exported 4-bit system computes the CTC
    posteriors the supernet computes for it."""
    from espnet2.tasks.asr import ASRTask

    enc = dict(SEED, quant_conf=dict(SEED["quant_conf"], conv2d=True))
    model = save_trained(asr_task, tmp_path, "elastic_conformer", enc, lr=0.05, systems=SYSTEMS,
                         decoder_quant={"bits": 0, "bit_choices": [4], "embedding": True, "ctc": True})
    quantized = {"encoder.embed.conv.0", "decoder.embed.0", "ctc.ctc_lo"}
    for system, bits in (("deep", 0), ("deep4", 4)):
        with model.system(system):
            found = {name: m.bits for name, m in model.named_modules() if name in quantized}
            assert found == dict.fromkeys(quantized, bits), system
    result = export_system(tmp_path / "config.yaml", tmp_path / "model.pth", "deep4", tmp_path / "deep4")
    standalone, _ = ASRTask.build_model_from_file(result.config, result.model_file, "cpu")
    standalone.eval()
    with torch.no_grad(), model.system("deep4"):
        want = model.ctc.log_softmax(_encode(model))
    with torch.no_grad():
        got = standalone.ctc.log_softmax(_encode(standalone))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
