"""A few dozen utterances through the whole pipeline: stock ESPnet programs train, decode, score.

Trains the stock ``conformer`` and a 4-bit QAT fine-tune of it; ``elastic_conformer`` is not trained
but the conformer's checkpoint reloaded with the encoder swapped: with the default plan the elastic
encoder is the stock encoder, so the stock ``asr_inference`` must give the same hypotheses with the
same scores.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from espnet_compress.pipeline.tiny import CONF_DIR, ReloadedSystem, TinyRunConfig, TinySystem, run_tiny
from tests.conftest import run_python

pytestmark = pytest.mark.slow


def _tiny_config(tmp: Path, encoder: str, bits: int = 0) -> Path:
    conf = yaml.safe_load((CONF_DIR / "train_asr_conformer_tiny.yaml").read_text())
    conf["encoder"] = encoder
    if bits:
        conf["model"] = "compressed"
        conf["model_conf"]["decoder_quant"] = {"bits": bits}
        conf["encoder_conf"]["quant_conf"] = {"bits": bits}
    conf["encoder_conf"].update(output_size=32, attention_heads=2, linear_units=64, num_blocks=2)
    conf["decoder_conf"].update(attention_heads=2, linear_units=64, num_blocks=1)
    conf.update(max_epoch=2, batch_bins=200000, num_workers=0, use_tensorboard=False)
    path = tmp / f"{encoder}{bits or ''}.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = TinyRunConfig(
        out_dir=tmp / "exp",
        systems=[TinySystem("conformer", _tiny_config(tmp, "conformer")),
                 TinySystem("fp32_ft", _tiny_config(tmp, "conformer"), "conformer"),
                 TinySystem("qat_4bit", _tiny_config(tmp, "quantized_conformer", bits=4), "conformer", packed=True,
                            control="fp32_ft")],
        reloaded=[ReloadedSystem("elastic_conformer", "conformer", "elastic_conformer")],
        baseline="conformer", num_train=40, num_dev=8, num_test=12, nj=2,
    )
    table = run_tiny(cfg)
    return cfg, table


def test_report_and_table(tiny_run):
    cfg, table = tiny_run
    out = Path(cfg.out_dir)
    assert [r.spec.name for r in table.rows] == ["conformer", "elastic_conformer", "fp32_ft", "qat_4bit"]
    data = json.loads((out / "compare" / "compare.json").read_text())
    assert data["baseline"] == "conformer"
    for system in data["systems"]:
        wer = system["test_sets"]["test"]["wer"]
        assert wer["num_sentences"] == 12 and wer["num_words"] > 12
        assert system["checkpoint_bytes"] == Path(system["model_file"]).stat().st_size
    report = (out / "report.md").read_text()
    assert "| reload:elastic_conformer |" in report and "MAPSSWE" in report
    assert "train:elastic_conformer" not in report
    stages = [s["name"] for s in json.loads((out / "stages.json").read_text())]
    assert stages == ["data", "token_list", "collect_stats", "train:conformer", "decode:conformer",
                      "reload:elastic_conformer", "decode:elastic_conformer", "train:fp32_ft", "decode:fp32_ft",
                      "train:qat_4bit", "export_packed:qat_4bit", "decode:qat_4bit", "score"]


def test_controlled_verdict_and_what_each_system_trained_for(tiny_run):
    """The QAT fine-tune is also tested against its equal-compute fp32 control, and the report
    says what every system was trained for and shows the dev-accuracy curve."""
    cfg, _ = tiny_run
    out = Path(cfg.out_dir)
    data = json.loads((out / "compare_vs_fp32_ft" / "compare.json").read_text())
    assert data["baseline"] == "fp32_ft" and [s["name"] for s in data["systems"]] == ["fp32_ft", "qat_4bit"]
    report = (out / "report.md").read_text()
    assert "## Against the equal-compute control `fp32_ft`" in report
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.splitlines() if line.startswith("| ") and "at most 2" in line}
    assert set(rows) == {"conformer", "fp32_ft", "qat_4bit"}
    assert rows["conformer"][0] == "scratch" and rows["qat_4bit"][0] == "conformer"
    assert all(r[2] == "2" and int(r[4]) > 0 for r in rows.values())  # epochs run, updates
    assert "![dev accuracy per epoch](dev_acc.png)" in report and (out / "dev_acc.png").stat().st_size > 0


def test_qat_system_is_decoded_from_its_packed_checkpoint(tiny_run):
    cfg, table = tiny_run
    out = Path(cfg.out_dir)
    row = next(r for r in table.rows if r.spec.name == "qat_4bit")
    assert row.spec.model_file == out / "asr_qat_4bit" / "packed" / "model.packed.pth"
    assert (out / "asr_qat_4bit" / "train.log").read_text().count("--init_param") >= 1
    fp32 = out / "asr_qat_4bit" / "valid.acc.best.pth"
    assert row.checkpoint_bytes < fp32.stat().st_size / 2  # the fp32 conv2d front end dominates a d=32 model
    report = json.loads((out / "asr_qat_4bit" / "packed" / "size_report.json").read_text())
    assert report["quantized_weights"]["ratio"] > 7.5  # 4-bit codes + one fp32 scale per tensor
    log = next((Path(row.spec.decode_dir) / "test" / "logdir").glob("asr_inference.*.log")).read_text()
    assert "espnet2.bin.asr_inference" in log.splitlines()[0]


def test_stock_programs_trained_our_encoder(tiny_run):
    cfg, _ = tiny_run
    out = Path(cfg.out_dir)
    train_conf = yaml.safe_load((out / "asr_qat_4bit" / "config.yaml").read_text())
    assert train_conf["encoder"] == "quantized_conformer"
    assert "espnet2.bin.asr_train" in (out / "asr_qat_4bit" / "train.log").read_text().splitlines()[0]


def test_reloaded_elastic_conformer_decodes_like_the_stock_one(tiny_run):
    cfg, table = tiny_run
    out = Path(cfg.out_dir)
    elastic, stock = out / "asr_elastic_conformer", out / "asr_conformer"
    assert not (elastic / "train.log").exists()  # no second training
    assert (elastic / "valid.acc.best.pth").resolve() == (stock / "valid.acc.best.pth").resolve()
    conf, stock_conf = (yaml.safe_load((d / "config.yaml").read_text()) for d in (elastic, stock))
    assert conf["encoder"] == "elastic_conformer"
    assert {k: v for k, v in conf.items() if k != "encoder"} == {k: v for k, v in stock_conf.items() if k != "encoder"}
    log = next((Path(table.rows[1].spec.decode_dir) / "test" / "logdir").glob("asr_inference.*.log")).read_text()
    assert "espnet2.bin.asr_inference" in log.splitlines()[0]
    hyps = [(Path(r.spec.decode_dir) / "test" / "text").read_text() for r in table.rows[:2]]
    assert hyps[0] == hyps[1]
    scores = [sorted((Path(r.spec.decode_dir) / "test" / "logdir").glob("output.*/1best_recog/score"))
              for r in table.rows[:2]]
    assert len(scores[0]) == len(scores[1]) == 2
    assert [p.read_text() for p in scores[0]] == [p.read_text() for p in scores[1]]
    report = (out / "report.md").read_text()
    assert "| elastic_conformer | `elastic_conformer` | conformer | 12 | 12 | 0 | identical |" in report


def test_rerun_skips_every_finished_stage(tiny_run):
    cfg, table = tiny_run
    out = Path(cfg.out_dir)
    outputs = [out / "data" / "train" / "text", out / "token_list" / "word" / "tokens.txt",
               out / "asr_stats" / "train" / "feats_stats.npz", *out.glob("asr_*/valid.acc.best.pth"),
               out / "asr_elastic_conformer" / "config.yaml", out / "asr_qat_4bit" / "packed" / "model.packed.pth",
               *out.glob("asr_*/**/decode_*/test/text")]
    assert len(outputs) == 13  # 4 trained systems (baseline, fp32 control, 8- and 4-bit QAT) + their decodes
    before = {p: p.stat().st_mtime_ns for p in outputs}
    rerun = run_tiny(cfg)
    assert [r.wer["test"].wer for r in rerun.rows] == [r.wer["test"].wer for r in table.rows]
    assert {p: p.stat().st_mtime_ns for p in outputs} == before


def test_pack_and_speech2text_in_user_code(tiny_run, tmp_path):
    cfg, table = tiny_run
    exp = Path(cfg.out_dir) / "asr_elastic_conformer"
    packed = tmp_path / "model.zip"
    proc = run_python(["-m", "espnet2.bin.pack", "asr", "--asr_train_config", str(exp / "config.yaml"),
                       "--asr_model_file", str(exp / "valid.acc.best.pth"), "--outpath", str(packed)],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with zipfile.ZipFile(packed) as zf:
        zf.extractall(tmp_path / "unpacked")
        names = zf.namelist()
    config = next(tmp_path / "unpacked" / n for n in names if n.endswith("config.yaml"))
    model = next(tmp_path / "unpacked" / n for n in names if n.endswith(".pth"))
    wav_scp = Path(cfg.out_dir) / "data" / "test" / "wav.scp"
    utt, wav = wav_scp.read_text().splitlines()[0].split(maxsplit=1)
    script = (
        "import soundfile, sys\n"
        "from espnet2.bin.asr_inference import Speech2Text\n"
        f"s2t = Speech2Text(asr_train_config={str(config)!r}, asr_model_file={str(model)!r}, "
        "beam_size=5, ctc_weight=0.3, device='cpu')\n"
        f"speech, _ = soundfile.read({wav!r})\n"
        "print(type(s2t.asr_model.encoder).__name__)\n"
        "print(s2t(speech)[0][0])\n"
    )
    proc = run_python(["-c", script], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    encoder_name, text = proc.stdout.rstrip("\n").split("\n")[-2:]
    assert encoder_name == "ElasticConformerEncoder"
    decoded = dict(
        (ln.split(maxsplit=1) + [""])[:2]
        for ln in (Path(table.rows[1].spec.decode_dir) / "test" / "text").read_text().splitlines()
    )
    assert text == decoded[utt]


def test_finished_trainings_are_marked_and_interrupted_ones_are_not(tiny_run, tmp_path):
    from espnet_compress.pipeline.stages import TRAIN_DONE, training_finished

    cfg, _ = tiny_run
    assert all((Path(cfg.out_dir) / f"asr_{s.name}" / TRAIN_DONE).is_file() for s in cfg.systems)
    # valid.acc.best.pth is written after the first epoch: alone it does not mean 'finished'
    interrupted = tmp_path / "asr_x"
    interrupted.mkdir()
    (interrupted / "valid.acc.best.pth").write_bytes(b"")
    (interrupted / "train.log").write_text("1epoch results ...\n")
    assert not training_finished(interrupted)
    (interrupted / "train.log").write_text("... INFO: The training was finished at 2 epochs \n")
    assert training_finished(interrupted)  # a run from before train.done existed
