"""The ESPnet recipes (``egs2/*/asr1``) and their configs (``conf/<corpus>/``) are correct without a
GPU or a corpus: every training config parses with asr_train's own parser (also on the command
line, ``--print_config``), builds its model, optimizer and scheduler through ESPnet's ``ASRTask``
and, when it uses this plugin's encoders or models, runs a training-mode forward pass; the QAT and
elastic configs accept their fp32 baseline's checkpoint as ``--init_param``; decoding configs parse
with asr_inference's parser; the recipe scripts are valid bash; symlinks point where ESPnet expects
them; and ``install_recipe.sh`` creates a complete recipe layout inside a (mock) ESPnet checkout.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from espnet_compress.registry import CHOICES
from tests.conftest import REPO

RECIPES: List[Path] = sorted(
    p for p in (REPO / "egs2").glob("*/asr1") if p.is_dir() and p.parent.name != "TEMPLATE"
)
TRAIN_CONFIGS: List[Path] = sorted((REPO / "conf").glob("*/train_*.yaml"))
DECODE_CONFIGS: List[Path] = sorted((REPO / "conf").glob("*/decode*.yaml"))
#: Recipes for GPU users that reuse ESPnet's own data preparation through install_recipe.sh.
GPU_CORPORA = ("swbd", "librispeech_100")
TEMPLATE_LINKS = ("asr.sh", "db.sh", "path.sh", "pyscripts", "scripts", "steps", "utils")
#: Recipe files that replace TEMPLATE's: the CPU recipe's path.sh is for a plain virtual environment.
OWN_FILES = {"spoken_commands": ("path.sh",)}
TOKENS = ["<blank>", "<unk>", "a", "b", "c", "<sos/eos>"]
#: Names this plugin registers (encoders, models): configs using them also run a forward pass,
#: except the 8-bit QAT configs, whose code path is the 4-bit one's (keeps the file well under 90 s).
OUR_NAMES = {name for entries in CHOICES.values() for name in entries}
NO_FORWARD = {"train_asr_quantized_conformer_8bit.yaml"}
CLI_CONFIG = REPO / "conf" / "swbd" / "train_asr_quantized_conformer_4bit.yaml"


def _ids(paths: List[Path]) -> List[str]:
    return [str(p.relative_to(REPO)) for p in paths]


def _yaml(path: Path) -> Dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def token_list(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text("\n".join(TOKENS) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def cli_print_config(token_list):
    """``python -m espnet2.bin.asr_train --config ... --print_config``, started with the module:
    the fresh interpreter spends most of its time importing ESPnet, which then overlaps with the
    in-process tests instead of adding to the file's run time. Checked by the test at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "espnet2.bin.asr_train", "--config", str(CLI_CONFIG), "--print_config",
         "--token_list", str(token_list)],
        cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _parse(asr_task, config: Path, token_list: Path):
    """asr_train's argument parsing as asr.sh stage 11 calls it, with ``--input_size 80`` (as for
    precomputed features: no frontend) and no normalization (global_mvn needs corpus statistics)."""
    parser = asr_task.ASRTask.get_parser()
    args = parser.parse_args(["--config", str(config), "--token_list", str(token_list), "--input_size", "80"])
    args.normalize = None
    return args


def _raw_waveform(conf: Dict) -> bool:
    """SSL configs (wav2vec2/HuBERT) take raw waveforms: no ESPnet front end (``input_size: 1``)."""
    return conf.get("input_size") == 1


def _build(asr_task, config: Path, token_list: Path, device: str = "cpu"):
    import torch

    args = _parse(asr_task, config, token_list)
    if _raw_waveform(_yaml(config)):
        # the pretrained weights are the user's local file: build the architecture only
        args.encoder_conf = {k: v for k, v in args.encoder_conf.items()
                             if k not in ("pretrained_path", "pretrained_layers")}
    with torch.device(device):
        model = asr_task.ASRTask.build_model(args)
    return args, model


# ------------------------------------------------------------------ training configs
def test_every_corpus_has_its_configs():
    for corpus in GPU_CORPORA:
        names = {p.name for p in (REPO / "conf" / corpus).iterdir()}
        assert {"train_asr_conformer.yaml", "train_asr_elastic_conformer.yaml",
                "train_asr_quantized_conformer_4bit.yaml", "train_asr_quantized_conformer_8bit.yaml",
                "decode_asr.yaml", "fbank.conf", "pitch.conf"} <= names, corpus


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=_ids(TRAIN_CONFIGS))
def test_config_builds_runs_and_sets_up_training(asr_task, config, token_list):
    """``ASRTask.build_model`` rejects unknown options of every sub-module (ours included); one
    forward pass in training mode exercises SpecAugment, the plan and the fake quantizers."""
    import torch
    from espnet2.tasks.abs_task import scheduler_classes

    conf = _yaml(config)
    args, model = _build(asr_task, config, token_list)
    assert isinstance(model.encoder, asr_task.encoder_choices.get_class(conf["encoder"]))
    assert isinstance(model, asr_task.model_choices.get_class(conf.get("model", "espnet")))
    if conf["decoder"] is None:
        assert model.decoder is None and conf["model_conf"]["ctc_weight"] == 1.0  # CTC-only
    else:
        assert isinstance(model.decoder, asr_task.decoder_choices.get_class(conf["decoder"]))

    # the raw-waveform path of asr.sh: the configured frontend at --frontend_conf fs=16k gives the
    # fbank size the config asks for (80 for the GPU recipes, 40 for the CPU-sized tiny corpus)
    frontend = asr_task.frontend_choices.get_class(asr_task.ASRTask.get_parser().get_default("frontend"))
    n_mels = conf.get("frontend_conf", {}).get("n_mels", 80)
    assert frontend(**{**conf.get("frontend_conf", {}), "fs": "16k"}).output_size() == n_mels
    assert n_mels == (40 if "spoken_commands" in str(config) else 80)

    optimizers = asr_task.ASRTask.build_optimizers(args, model)
    scheduler = scheduler_classes[args.scheduler](optimizers[0], **args.scheduler_conf)
    assert scheduler is not None

    if not {conf["encoder"], conf.get("model")} & OUR_NAMES or config.name in NO_FORWARD:
        return  # a stock ESPnet model: building it is the check; its forward is ESPnet's business
    torch.manual_seed(0)
    if _raw_waveform(conf):
        speech, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])  # 24 and 18 frames of 20 ms
    else:
        speech, lengths = torch.randn(2, 64, 80), torch.tensor([64, 48])  # 15 and 11 frames after 4x
    text = torch.tensor([[2, 3, 4], [4, 2, -1]])
    model.train()
    with torch.no_grad():
        loss, stats, _ = model(speech, lengths, text, torch.tensor([3, 2]))
    assert torch.isfinite(loss), stats


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=_ids(TRAIN_CONFIGS))
def test_print_config_round_trips_every_option(asr_task, config, token_list, monkeypatch):
    """``asr_train --print_config``, in process: what it prints contains every option the file sets."""
    conf = _yaml(config)
    monkeypatch.setattr(sys, "argv", ["asr_train.py", "--config", str(config), "--token_list", str(token_list)])
    out = io.StringIO()
    asr_task.ASRTask.print_config(file=out)
    printed = yaml.safe_load(out.getvalue())
    for key, value in conf.items():
        if key.endswith("_conf") and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                assert printed[key][sub_key] == sub_value, f"{key}.{sub_key}"
        elif key in ("patience", "init") and value == "none":
            assert printed[key] in (None, "none"), key
        else:
            assert printed[key] == value, key


@pytest.mark.parametrize("corpus", GPU_CORPORA)
def test_compressed_configs_initialise_from_the_fp32_baseline(asr_task, corpus, token_list):
    """``--init_param <fp32 model>`` as ESPnet's ``load_pretrained_model`` applies it: every tensor
    of the fp32 checkpoint has a same-shaped slot and every parameter of the compressed model is
    initialised from it. Built on the meta device: shapes only, no memory, no time."""
    conf_dir = REPO / "conf" / corpus
    _, fp32 = _build(asr_task, conf_dir / "train_asr_conformer.yaml", token_list, device="meta")
    src = fp32.state_dict()
    for name in ("train_asr_elastic_conformer.yaml", "train_asr_quantized_conformer_4bit.yaml",
                 "train_asr_quantized_conformer_8bit.yaml"):
        _, model = _build(asr_task, conf_dir / name, token_list, device="meta")
        dst = model.state_dict()
        assert set(src) <= set(dst), f"{name}: keys the model lacks: {sorted(set(src) - set(dst))[:5]}"
        assert {k: v.shape for k, v in src.items()} == {k: dst[k].shape for k in src}, name
        params = {k for k, _ in model.named_parameters()}
        assert params <= set(src), f"{name}: parameters left at random init: {sorted(params - set(src))[:5]}"
        dst.update(src)
        model.load_state_dict(dst, assign=True)  # load_pretrained_model's call (assign: meta tensors)


@pytest.mark.parametrize("corpus", GPU_CORPORA)
def test_documented_example_plan_is_valid(asr_task, corpus, token_list):
    """The ``plan:`` example in the elastic config's header builds (plans are validated at build time)."""
    import torch

    config = REPO / "conf" / corpus / "train_asr_elastic_conformer.yaml"
    match = re.search(r"^#\s+plan:\s*(\{.*\})\s*$", config.read_text(), flags=re.M)
    assert match, "example plan missing from the header"
    plan = yaml.safe_load(match.group(1))
    args = _parse(asr_task, config, token_list)
    encoder_class = asr_task.encoder_choices.get_class(args.encoder)
    with torch.device("meta"):
        encoder = encoder_class(80, **{**args.encoder_conf, "plan": plan})
    assert list(encoder.plan.blocks) == plan["blocks"]


def test_qat_configs_differ_from_their_baseline_only_where_intended():
    """Same network as the fp32 baseline (so the checkpoint fits); only quantization and the
    fine-tuning schedule change."""
    for corpus in GPU_CORPORA:
        base = _yaml(REPO / "conf" / corpus / "train_asr_conformer.yaml")
        elastic = _yaml(REPO / "conf" / corpus / "train_asr_elastic_conformer.yaml")
        assert {**elastic, "encoder": "conformer"} == base
        for bits in (4, 8):
            qat = _yaml(REPO / "conf" / corpus / f"train_asr_quantized_conformer_{bits}bit.yaml")
            assert qat["model"] == "compressed" and qat["encoder"] == "quantized_conformer"
            assert qat["encoder_conf"].pop("quant_conf")["bits"] == bits
            assert qat["model_conf"].pop("decoder_quant")["bits"] == bits
            for key in ("encoder_conf", "decoder", "decoder_conf", "model_conf", "frontend_conf",
                        "specaug", "specaug_conf", "batch_bins", "accum_grad"):
                assert qat[key] == base[key], (corpus, bits, key)
            assert qat["max_epoch"] < base["max_epoch"], (corpus, bits)
            assert qat["optim_conf"]["lr"] < base["optim_conf"]["lr"], (corpus, bits)


#: GPU configs trained from scratch like the fp32 baseline: everything but the network is the baseline's
FROM_SCRATCH = ("train_asr_nested_conformer.yaml", "train_asr_foldable_conformer.yaml",
                "train_asr_one_bit_cotrain.yaml")


@pytest.mark.parametrize("corpus", GPU_CORPORA)
def test_from_scratch_configs_share_the_baselines_training_settings(corpus):
    """A compressed system trained from scratch is judged against the baseline trained the same way:
    data, front end, SpecAugment, batch, optimiser, schedule and epochs must be the baseline's."""
    base = _yaml(REPO / "conf" / corpus / "train_asr_conformer.yaml")
    configs = [REPO / "conf" / corpus / name for name in FROM_SCRATCH]
    for config in [c for c in configs if c.exists()]:
        conf = _yaml(config)
        differs = {k for k in set(base) | set(conf) if base.get(k) != conf.get(k)} - set(NETWORK_KEYS)
        assert not differs, f"{config.name}: differs from the baseline in {sorted(differs)}"
        assert conf["decoder_conf"] == base["decoder_conf"] and conf.get("init") == base.get("init")


def test_swbd_one_bit_config_is_the_authors_setting(asr_task, token_list):
    """The authors' 12-block stochastic schedule (0.305 .. 0.905), 1-bit and 2-bit systems that differ
    only in the Conformer blocks' widths (the conv module stays 4-bit), and the header's "1.5-bit"
    decode plan: blocks 0-5 at 1 bit, 6-11 at 2 bits; the loss weights and the mean over the three
    systems of the authors' code."""
    import json

    config = REPO / "conf" / "swbd" / "train_asr_one_bit_cotrain.yaml"
    _, model = _build(asr_task, config, token_list, device="meta")
    assert (model.system_loss, model.kl_weight, model.kl_target, model.kl_reduction) == ("mean", 1.0, "hybrid", "utterance")
    assert {n: s.weight for n, s in model.systems.items() if n != model.largest} == {"bit1": 0.5, "mix": 0.5}
    probs = model.systems["mix"].stochastic.probs
    assert len(probs) == 12 and round(probs[0], 3) == 0.305 and round(probs[-1], 3) == 0.905
    match = re.search(r"ESPNET_COMPRESS_PLAN='(\{.*\})'", config.read_text())
    assert match, "the 1.5-bit plan example is missing from the header"
    plan = model.encoder.check_plan(json.loads(match.group(1)))
    bit1, bit2 = model.systems["bit1"].plan, model.systems["bit2"].plan
    for name in model.encoder.quantizable_modules():
        if ".conv_module." in name:
            assert plan.bits_for(name) == bit1.bits_for(name) == bit2.bits_for(name) == 4, name
        elif name.startswith("encoders."):
            block = int(name.split(".")[1])
            assert plan.bits_for(name) == (1 if block < 6 else 2), name
            assert (bit1.bits_for(name), bit2.bits_for(name)) == (1, 2), name
        else:
            assert plan.bits_for(name) == bit2.bits_for(name), name


#: what a tiny config may change: the network (encoder, model and their options), ESPnet's parameter
#: freezing; everything else is the baseline's training setting, so every twin and baseline trains
#: on the same data settings and stops by the same rule
NETWORK_KEYS = ("encoder", "encoder_conf", "model", "model_conf", "freeze_param")
#: a fine-tune (from the baseline's checkpoint) has its own schedule: the fp32 control's
SCHEDULE_KEYS = ("max_epoch", "patience", "early_stopping_criterion", "optim", "optim_conf", "scheduler",
                 "scheduler_conf")
TINY = REPO / "conf" / "spoken_commands"
TINY_CONFIGS = sorted(TINY.glob("train_*.yaml"))
#: fine-tunes whose schedule is knowingly not the control's (each needs its own control)
_DARTS_ARCH = "DARTS stage 2: trains only alpha (constant-rate Adam), not a fine-tune"
OWN_SCHEDULE = {
    "train_asr_quantized_conformer_tiny_2bit.yaml": "6 epochs: no fp32 control trains as long",
    **{f"train_asr_searchable_conformer_tiny{v}_stage2.yaml": _DARTS_ARCH for v in ("", "_rank", "_both")},
}


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=_ids(TINY_CONFIGS))
def test_tiny_configs_share_the_baselines_training_settings(config):
    """Configs cannot include one another, so this test is the single source of truth's guard: a
    tiny config differs from the fp32 baseline only in its network, or, for a fine-tune from the
    baseline, in the schedule of the equal-compute fp32 control (same epochs, same optimiser)."""
    base = _yaml(TINY / "train_asr_conformer_tiny.yaml")
    control = _yaml(TINY / "train_asr_conformer_tiny_finetune.yaml")
    conf = _yaml(config)
    differs = {k for k in set(base) | set(conf) if base.get(k) != conf.get(k)} - set(NETWORK_KEYS)
    if differs & set(SCHEDULE_KEYS) and config.name not in OWN_SCHEDULE:
        mismatched = [k for k in SCHEDULE_KEYS if conf.get(k) != control.get(k)]
        assert not mismatched, f"{config.name}: a fine-tune must use the control's schedule; differs in {mismatched}"
    assert differs <= set(SCHEDULE_KEYS), f"{config.name}: differs from the baseline in {sorted(differs)}"


# ------------------------------------------------------------------ decoding configs
@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=_ids(DECODE_CONFIGS))
def test_decode_config_parses_with_asr_inference(config, tmp_path):
    from espnet2.bin.asr_inference import get_parser

    args = get_parser().parse_args(["--config", str(config), "--output_dir", str(tmp_path),
                                    "--data_path_and_name_and_type", "wav.scp,speech,sound"])
    for key, value in _yaml(config).items():
        assert getattr(args, key) == value, key


# ------------------------------------------------------------------ recipe directories
def test_recipes_found():
    assert {p.parent.name for p in RECIPES} >= set(GPU_CORPORA)


def _recipe_scripts(recipe: Path) -> List[Path]:
    scripts = [p for p in recipe.glob("*.sh") if not p.is_symlink()]
    local = recipe / "local"
    if local.is_dir() and not local.is_symlink():
        scripts += sorted(local.glob("*.sh"))
    return scripts


@pytest.mark.parametrize("recipe", RECIPES, ids=_ids(RECIPES))
def test_recipe_scripts_are_valid_bash(recipe):
    run_sh = recipe / "run.sh"
    assert run_sh.is_file() and os.access(run_sh, os.X_OK), "run.sh missing or not executable"
    for script in _recipe_scripts(recipe):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.relative_to(REPO)}: {proc.stderr}"


@pytest.mark.parametrize("recipe", RECIPES, ids=_ids(RECIPES))
def test_recipe_links_and_referenced_configs(recipe):
    corpus = recipe.parent.name
    conf = recipe / "conf"
    assert conf.is_symlink() and os.readlink(conf) == f"../../../conf/{corpus}"
    assert conf.resolve() == (REPO / "conf" / corpus).resolve() and conf.is_dir()
    for name in TEMPLATE_LINKS:  # they resolve once the recipe sits in <espnet>/egs2/<name>/asr1
        if name in OWN_FILES.get(corpus, ()):
            assert (recipe / name).is_file() and not (recipe / name).is_symlink(), name
            continue
        assert os.readlink(recipe / name) == f"../../TEMPLATE/asr1/{name}", name
    for doc in ("run.sh", "README.md"):
        path = recipe / doc
        if not path.exists():
            continue
        for ref in set(re.findall(r"\bconf/([\w.-]+\.(?:yaml|conf))\b", path.read_text())):
            assert (conf / ref).is_file(), f"{doc} refers to conf/{ref}, which does not exist"
    run_sh = (recipe / "run.sh").read_text()
    for var in ("asr_config", "inference_config"):
        match = re.search(rf"^{var}=(\S+)", run_sh, flags=re.M)
        assert match and (recipe / match.group(1)).is_file(), var


def test_swbd_decoding_dir_matches_espnet_hub5_scoring():
    """ESPnet's swbd local/score.sh (run by asr.sh stage 13) scores ``<exp>/decode_*/eval2000``;
    asr.sh names that directory after the inference config."""
    run_sh = (REPO / "egs2" / "swbd" / "asr1" / "run.sh").read_text()
    inference_config = re.search(r"^inference_config=(\S+)", run_sh, flags=re.M).group(1)
    assert Path(inference_config).name.startswith("decode_")
    assert re.search(r'^test_sets="eval2000', run_sh, flags=re.M)


# ------------------------------------------------------------------ installing into ESPnet
def _mock_espnet(root: Path, corpus: str) -> Path:
    template = root / "egs2" / "TEMPLATE" / "asr1"
    for d in ("pyscripts", "scripts", "steps", "utils"):
        (template / d).mkdir(parents=True)
    for f in ("asr.sh", "db.sh", "path.sh"):
        (template / f).write_text("")
    local = root / "egs2" / corpus / "asr1" / "local"
    local.mkdir(parents=True)
    (local / "data.sh").write_text("")
    (local / "path.sh").write_text("")
    return root


def _install(corpus: str, *args: str) -> subprocess.CompletedProcess:
    script = REPO / "egs2" / corpus / "asr1" / "install_recipe.sh"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True)


def test_project_scripts_are_valid_bash():
    for script in sorted((REPO / "tools").glob("*.sh")) + [REPO / ".ci" / "run"]:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_install_scripts_are_one_script():
    for c in GPU_CORPORA:
        link = REPO / "egs2" / c / "asr1" / "install_recipe.sh"
        assert link.is_symlink() and link.resolve() == REPO / "tools" / "install_recipe.sh"


@pytest.mark.parametrize("corpus", GPU_CORPORA)
def test_install_recipe_into_espnet(corpus, tmp_path):
    espnet = _mock_espnet(tmp_path / "espnet", corpus)
    proc = _install(corpus, str(espnet))
    assert proc.returncode == 0, proc.stderr
    dst = espnet / "egs2" / f"{corpus}_compress" / "asr1"
    for name in TEMPLATE_LINKS:
        assert os.readlink(dst / name) == f"../../TEMPLATE/asr1/{name}" and (dst / name).exists(), name
    assert os.readlink(dst / "local") == f"../../{corpus}/asr1/local"
    assert (dst / "local" / "data.sh").is_file() and (dst / "local" / "path.sh").is_file()
    assert os.access(dst / "run.sh", os.X_OK) and (dst / "cmd.sh").is_file()
    src_conf = REPO / "conf" / corpus
    assert not (dst / "conf").is_symlink()
    assert sorted(p.name for p in (dst / "conf").iterdir()) == sorted(p.name for p in src_conf.iterdir())
    assert (dst / "conf" / "train_asr_conformer.yaml").read_text() == (src_conf / "train_asr_conformer.yaml").read_text()
    assert _install(corpus, str(espnet)).returncode == 0  # re-running refreshes the install

    # --link-conf: conf is a link to the plugin's canonical configs
    proc = _install(corpus, "--link-conf", str(espnet), "mine")
    assert proc.returncode == 0, proc.stderr
    linked = espnet / "egs2" / "mine" / "asr1" / "conf"
    assert linked.is_symlink() and linked.resolve() == src_conf.resolve()

    # ESPnet's own recipe is never the target, and a checkout without it is refused
    proc = _install(corpus, str(espnet), corpus)
    assert proc.returncode != 0 and "refusing" in proc.stderr
    assert sorted(p.name for p in (espnet / "egs2" / corpus / "asr1").iterdir()) == ["local"]
    bare = tmp_path / "bare"
    (bare / "egs2" / "TEMPLATE" / "asr1").mkdir(parents=True)
    (bare / "egs2" / "TEMPLATE" / "asr1" / "asr.sh").write_text("")
    proc = _install(corpus, str(bare))
    assert proc.returncode != 0 and f"egs2/{corpus}/asr1/local/data.sh" in proc.stderr


# ------------------------------------------------------------------ the command line (started first)
def test_print_config_cli_with_the_plugin(cli_print_config):
    """The command line a user would type, in a fresh interpreter (the import hook registers us)."""
    stdout, stderr = cli_print_config.communicate(timeout=600)
    assert cli_print_config.returncode == 0, stderr[-3000:]
    printed = yaml.safe_load(stdout)
    assert printed["model"] == "compressed" and printed["encoder"] == "quantized_conformer"
    assert printed["encoder_conf"]["quant_conf"]["bits"] == 4
    assert printed["model_conf"]["decoder_quant"]["bits"] == 4
    assert printed["encoder_conf"]["num_blocks"] == 12 and printed["encoder_conf"]["linear_units"] == 2048


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=_ids(TINY_CONFIGS))
def test_tiny_configs_stopping_rule_is_one_espnet_accepts(config):
    """asr_train reads ``early_stopping_criterion`` from a config without checking its shape and
    fails only when the first epoch ends (a list of lists, as for ``best_model_criterion``, crashes
    ``Reporter.check_early_stopping``); the rule must be one flat [phase, key, min|max]."""
    from espnet_compress.pipeline.convergence import StoppingRule

    rule = StoppingRule.from_config(_yaml(config))
    assert all(isinstance(part, str) for part in rule.criterion), f"{config.name}: {rule.criterion}"
    assert rule.patience in (None, 5), f"{config.name}: patience {rule.patience}"


def test_one_bit_benchmarks_whole_model_layouts_quantize_what_they_say(asr_task, token_list, tmp_path):
    """``one_bit.py --all_1bit [--float_first_conv]`` derive their configs from the 1-bit config: every
    encoder Linear/Conv at 1 bit, the Conv2d subsampling included; with ``keep_float`` the first
    convolution (one input channel) carries no quantizer and the second still does."""
    from espnet_compress.quant.api import quantized_modules
    from tests.conftest import benchmark

    one_bit = benchmark("one_bit")
    for keep_float in ((), one_bit.FLOAT_FIRST_CONV):
        config = one_bit.whole_model_variant(one_bit.ALONE[1], tmp_path, one_bit.ALL_ONE_BIT,
                                             f"layout{len(keep_float)}.yaml", keep_float=keep_float)
        _, model = _build(asr_task, config, token_list)
        quantized = quantized_modules(model.encoder)
        assert {m.bits for m in quantized.values()} == {1}
        assert "embed.conv.2" in quantized
        assert ("embed.conv.0" in quantized) == (not keep_float)
