"""wav2vec2/HuBERT side of the elastic core: same plans, same systems, same export as the Conformer."""
from __future__ import annotations

import pytest
import torch
import yaml
from torchaudio.models import wav2vec2_model

from espnet_compress.core.plan import PlanError
from espnet_compress.encoders.aliases import FoldableWav2Vec2Encoder, QuantizedWav2Vec2Encoder
from espnet_compress.encoders.wav2vec2 import ElasticWav2Vec2Encoder, Wav2Vec2LoadError

CONV = [[16, 10, 5], [16, 3, 2], [16, 3, 2]]
W2V = dict(extractor_conv_layer_config=CONV, encoder_embed_dim=32, encoder_pos_conv_kernel=8,
           encoder_pos_conv_groups=4, encoder_num_layers=3, encoder_num_heads=2, encoder_ff_interm_features=48,
           encoder_layer_drop=0.0, encoder_dropout=0.0, encoder_attention_dropout=0.0,
           encoder_projection_dropout=0.0, freeze_feature_extractor=False)


def reference(num_layers: int = 3, ff: int = 48) -> torch.nn.Module:
    """torchaudio's own Wav2Vec2Model with the same architecture options."""
    return wav2vec2_model("group_norm", [tuple(c) for c in CONV], False, 32, 0.0, 8, 4, num_layers, 2, 0.0, ff,
                          0.0, 0.0, False, 0.0, None).eval()


def wave():
    torch.manual_seed(5)
    return torch.randn(2, 3200), torch.tensor([3200, 2400])


def _encoder(cls=ElasticWav2Vec2Encoder, **kw):
    torch.manual_seed(0)
    return cls(1, **{**W2V, **kw}).eval()


def test_default_plan_is_torchaudio_wav2vec2():
    enc, ref = _encoder(), reference()
    ref.load_state_dict(enc.model.state_dict())
    x, lens = wave()
    out, olens, _ = enc(x, lens)
    want, want_lens = ref(x, lens)
    torch.testing.assert_close(out, want)
    assert torch.equal(olens, want_lens)
    with pytest.raises(ValueError, match="raw waveforms"):
        enc(torch.randn(2, 3200, 40), lens)


def test_train_mode_with_layer_drop_equals_torchaudio():
    """torchaudio drops each layer when ``rand <= layer_drop``; the plan does the same per logical
    step, with the same draws, so training matches the stock network step for step."""
    drop = dict(encoder_layer_drop=0.5, encoder_dropout=0.1)
    enc = _encoder(**drop).train()
    ref = wav2vec2_model("group_norm", [tuple(c) for c in CONV], False, 32, 0.0, 8, 4, 3, 2, 0.0, 48,
                         0.0, 0.1, False, 0.5, None).train()
    ref.load_state_dict(enc.model.state_dict())
    x, lens = wave()
    for seed in range(4):  # several draws: some drop layers, some do not
        torch.manual_seed(seed)
        out = enc(x, lens)[0]
        torch.manual_seed(seed)
        torch.testing.assert_close(out, ref(x, lens)[0], rtol=0, atol=0)


def _copy_layers(ref: torch.nn.Module, enc: ElasticWav2Vec2Encoder, layers, units: int) -> None:
    """``ref`` gets the encoder's non-layer weights and, as its layer i, physical layer layers[i]
    with the FFN cut to its first ``units`` hidden units."""
    state = {k: v for k, v in enc.model.state_dict().items() if ".transformer.layers." not in k}
    for i, src in enumerate(layers):
        for k, v in enc.model.encoder.transformer.layers[src].state_dict().items():
            if "intermediate_dense" in k:
                v = v[:units]
            elif "output_dense.weight" in k:
                v = v[:, :units]
            state[f"encoder.transformer.layers.{i}.{k}"] = v
    ref.load_state_dict(state)


def test_skipped_narrowed_and_unfolded_plans_equal_explicit_smaller_models():
    x, lens = wave()
    enc = _encoder()
    with enc.using({"blocks": [0, 2], "ffn_units": 24}):
        got, _, _ = enc(x, lens)
    ref = reference(num_layers=2, ff=24)
    _copy_layers(ref, enc, [0, 2], 24)
    torch.testing.assert_close(got, ref(x, lens)[0], rtol=1e-5, atol=1e-6)

    seed = _encoder(FoldableWav2Vec2Encoder, fold={"depth": 5})
    assert seed.plan.blocks == (0, 1, 1, 2, 2)
    deep = reference(num_layers=5)
    _copy_layers(deep, seed, [0, 1, 1, 2, 2], 48)
    torch.testing.assert_close(seed(x, lens)[0], deep(x, lens)[0], rtol=1e-5, atol=1e-6)
    assert seed.physical_parameters() == enc.physical_parameters()  # unfolding adds no weights


def test_bad_plans_name_the_problem():
    enc = _encoder()
    with pytest.raises(PlanError, match="blocks names block 3"):
        enc.set_plan({"blocks": [0, 3]})
    with pytest.raises(PlanError, match="ffn_units 96 is outside 1..48"):
        enc.set_plan({"ffn_units": 96})
    with pytest.raises(PlanError, match=r"\[.depth.\] need the .fold. feature \(encoder_conf.fold\)"):
        enc.set_plan({"depth": 4})
    with pytest.raises(PlanError, match=r"switch the quantization feature on \(encoder_conf.quant_conf\)"):
        enc.set_plan({"bits": 4})
    with pytest.raises(PlanError, match="below the 3 physical blocks"):
        _encoder(FoldableWav2Vec2Encoder).set_plan({"depth": 2})


def test_quantized_layers_follow_the_plan_and_the_cnn_can_stay_fp():
    enc = _encoder(QuantizedWav2Vec2Encoder,
                   quant_conf={"bits": 4, "bit_choices": [2, 4, 8], "exclude": ["model.feature_extractor.*"]})
    names = list(enc.quantizable_modules())
    assert names and not any(n.startswith("model.feature_extractor") for n in names)
    assert "model.encoder.transformer.layers.2.feed_forward.intermediate_dense" in names
    assert all(m.bits == 4 for m in enc.quantizable_modules().values())
    with enc.using({"bits": {"model.encoder.transformer.layers.*": 2, "*": 8}}):
        bits = {n: m.bits for n, m in enc.quantizable_modules().items()}
        assert bits["model.encoder.transformer.layers.0.attention.k_proj"] == 2
        assert bits["model.encoder.feature_projection.projection"] == 8
    fp32 = _encoder()
    assert enc.executed_weight_bits(enc.plan) * 8 == fp32.executed_weight_bits(fp32.plan)  # 4 vs 32 bits


def test_pretrained_layers_are_loaded_from_a_local_file(tmp_path):
    teacher = reference(num_layers=3)
    path = tmp_path / "w2v.pth"
    torch.save(teacher.state_dict(), path)
    seed = _encoder(FoldableWav2Vec2Encoder, encoder_num_layers=2, pretrained_path=str(path), pretrained_layers=[0, 2])
    torch.testing.assert_close(seed.model.encoder.transformer.layers[1].attention.k_proj.weight,
                               teacher.encoder.transformer.layers[2].attention.k_proj.weight)
    torch.testing.assert_close(seed.model.feature_extractor.conv_layers[0].conv.weight,
                               teacher.feature_extractor.conv_layers[0].conv.weight)
    with pytest.raises(Wav2Vec2LoadError, match="does not exist"):
        _encoder(pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(Wav2Vec2LoadError, match=r"has layers \[0, 1, 2\], not \[5\]"):
        _encoder(encoder_num_layers=1, pretrained_path=str(path), pretrained_layers=[5])
    with pytest.raises(Wav2Vec2LoadError, match="does not fit the configured network"):
        _encoder(encoder_embed_dim=64, pretrained_path=str(path))
    with pytest.raises(Wav2Vec2LoadError, match="needs pretrained_path"):
        _encoder(pretrained_layers=[0, 1, 2])


# ---------------------------------------------------------------------------------------- in ESPnet
def _w2v_args(asr_task, tmp_path, encoder: str, enc_conf, model_conf):
    token_list = tmp_path / "tokens.txt"
    token_list.write_text("<blank>\n<unk>\nA\nB\n<sos/eos>\n")
    args = asr_task.ASRTask.get_parser().parse_args(
        ["--token_list", str(token_list), "--input_size", "1", "--output_dir", str(tmp_path)])
    args.encoder, args.encoder_conf = encoder, enc_conf
    args.frontend, args.normalize, args.specaug = None, None, None
    args.decoder, args.decoder_conf = "transformer", {"num_blocks": 1, "linear_units": 16, "attention_heads": 2}
    args.model, args.model_conf = "compressed", model_conf
    return args


def _batch():
    x, lens = wave()
    return dict(speech=x, speech_lengths=lens, text=torch.tensor([[2, 3, 2], [3, 2, -1]]),
                text_lengths=torch.tensor([3, 2]))


FOLD_SYSTEMS = {"unfolded": {"depth": 5}, "seed": {"depth": 3, "weight": 0.25}}


def test_foldable_wav2vec2_trains_jointly_through_the_stock_task(asr_task, tmp_path):
    results = []
    for share in (True, False):
        args = _w2v_args(asr_task, tmp_path, "foldable_wav2vec2", dict(W2V, fold={"order": "cycle"}),
                         {"ctc_weight": 0.3, "systems": FOLD_SYSTEMS, "share_computation": share})
        torch.manual_seed(0)
        model = asr_task.ASRTask.build_model(args)
        model.train()
        loss, stats, _ = model(**_batch())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((stats, grads, model.last_step_sharing))
    (stats, grads, (hits, _)), (plain_stats, plain_grads, _) = results
    torch.testing.assert_close(stats["loss"], stats["loss_unfolded"] + 0.25 * stats["loss_seed"] + 0.1 * stats["kl_seed"])
    torch.testing.assert_close(stats["loss"], plain_stats["loss"], rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():  # equal up to summation order: tolerance scaled to the tensor
        scale = float(plain_grads[name].abs().max())
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6 + 1e-5 * scale, msg=name)
    assert "encoder.model.feature_extractor.conv_layers.0.conv.weight" in grads
    # cycle order: the seed (0 1 2) is the first half of depth 5 (0 1 2 1 2): input + 3 layers reused
    assert hits == 4


@pytest.mark.slow
def test_a_nested_wav2vec2_system_exports_and_decodes_alone(asr_task, tmp_path):
    from espnet2.tasks.asr import ASRTask

    from espnet_compress.export.system_export import export_system

    systems = {"full": {}, "small": {"blocks": [0, 1], "ffn_units": 24}, "int4": {"bits": 4}}
    quant = {"bits": 0, "bit_choices": [4], "exclude": ["model.feature_extractor.*"]}
    args = _w2v_args(asr_task, tmp_path, "quantized_wav2vec2", dict(W2V, quant_conf=quant),
                     {"ctc_weight": 0.3, "systems": systems})
    torch.manual_seed(0)
    model = asr_task.ASRTask.build_model(args)
    model.train()
    loss, _, _ = model(**_batch())
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    model.eval()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    b = _batch()
    for name, packed in (("small", False), ("int4", True)):
        result = export_system(tmp_path / "config.yaml", tmp_path / "model.pth", name, tmp_path / name)
        assert not result.stock and result.packed == packed  # no stock ESPnet twin for wav2vec2
        conf = yaml.safe_load(result.config.read_text())
        assert conf["encoder"] == "elastic_wav2vec2" and ("quant_conf" in conf["encoder_conf"]) == packed
        standalone, _ = ASRTask.build_model_from_file(result.config, result.model_file, "cpu")
        standalone.eval()
        with torch.no_grad(), model.system(name):
            want, _ = model.encode(b["speech"], b["speech_lengths"])
        with torch.no_grad():
            got, _ = standalone.encode(b["speech"], b["speech_lengths"])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    small = yaml.safe_load((tmp_path / "small" / "config.yaml").read_text())["encoder_conf"]
    assert small["encoder_num_layers"] == 2 and small["encoder_ff_interm_features"] == 24


def test_ssl_weights_lists_bundles_and_rejects_unknown_ones(capsys):
    from espnet_compress.bin.ssl_weights import main, ssl_bundles

    assert {"HUBERT_BASE", "WAV2VEC2_BASE"} <= set(ssl_bundles())
    assert main(["--bundle", "HUBERT_TINY", "--out", "x.pth"]) == 2
    err = capsys.readouterr().err
    assert "unknown bundle 'HUBERT_TINY'" in err and "HUBERT_BASE" in err
