"""KL-sensitivity mixed precision: exact DP allocation, Omega measurement, cache, emitted config, CLI."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch
import yaml

from espnet_compress.bin import mixed_precision as cli
from espnet_compress.mixed_precision.allocation import (AllocationError, Budget, Problem, allocate_nested, solve,
                                                        storage_bits)
from espnet_compress.mixed_precision.sensitivity import (SensitivityError, SensitivityTable, config_fragment,
                                                         fingerprint, load_or_measure, measure, measured_layers,
                                                         merge_fragment)
from espnet_compress.quant.api import quantized_modules
from tests.conftest import tiny_conformer_options

FEAT_DIM = 20
TOKENS = ["<blank>", "<unk>", "A", "B", "C", "<sos/eos>"]


def _random_problem(rng: np.random.Generator, layers: int, widths=(1, 2, 4, 8)) -> Problem:
    params = tuple(int(p) for p in rng.integers(1, 6, size=layers))
    omega = np.sort(rng.uniform(0, 1, size=(layers, len(widths))), axis=1)[:, ::-1].copy()
    omega[rng.uniform(size=omega.shape) < 0.15] = np.nan  # some widths not allowed somewhere
    omega[np.isnan(omega).all(axis=1), -1] = 0.0
    return Problem(tuple(f"l{i}" for i in range(layers)), params, widths, omega)


def _brute_force(problem: Problem, limit: int) -> float:
    best = np.inf
    options = [[(storage_bits(w), problem.omega[i, j]) for j, w in enumerate(problem.widths)
                if not np.isnan(problem.omega[i, j])] for i in range(len(problem.names))]
    for combo in itertools.product(*options):
        size = sum(p * s for p, (s, _) in zip(problem.params, combo))
        if size <= limit:
            best = min(best, sum(o for _, o in combo))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    problem = _random_problem(rng, layers=5)
    frontier = solve(problem)
    assert (np.diff(frontier.total_bits) > 0).all() and (np.diff(frontier.omega) < 0).all()
    smallest, _ = problem.bounds()
    for limit in range(smallest, problem.num_weights * 8 + 1, 3):
        alloc = frontier.best_under(Budget(limit, "bits"))
        assert alloc.total_bits <= limit
        assert alloc.omega == pytest.approx(_brute_force(problem, limit), abs=1e-12)
        assert problem.omega_of(alloc.bits) == pytest.approx(alloc.omega)  # back-pointers rebuild the point


def test_nested_allocations_never_lose_bits_as_they_grow():
    problem = _random_problem(np.random.default_rng(3), layers=7)
    budgets = [Budget(v) for v in (6.0, 2.5, 4.0)]
    allocs = allocate_nested(problem, budgets, monotonic=True)
    by_size = sorted(allocs, key=lambda a: a.total_bits)
    for small, big in zip(by_size, by_size[1:]):
        assert all(big.bits[n] >= small.bits[n] for n in problem.names)
    for budget, alloc in zip(budgets, allocs):
        assert alloc.total_bits <= budget.total_bits(problem.num_weights)
    # the smallest system is the unconstrained optimum of its budget
    assert allocs[1].omega == pytest.approx(solve(problem).best_under(budgets[1]).omega)


def test_impossible_budgets_and_widths_are_named():
    problem = _random_problem(np.random.default_rng(0), layers=3, widths=(2, 4))
    frontier = solve(problem)
    with pytest.raises(AllocationError, match="below the smallest model"):
        frontier.best_under(Budget(1.0))
    with pytest.raises(AllocationError, match="above full precision"):
        frontier.best_under(Budget(33.0))
    with pytest.raises(AllocationError, match="budget must be a positive"):
        Budget(-1.0)
    with pytest.raises(ValueError, match="unsupported bit width 7"):
        Problem(("a",), (1,), (7,), np.zeros((1, 1)))


# --- measurement on a real (tiny) ESPnet model --------------------------------------------------


def _args(asr_task, root: Path, frontend: bool = False):
    root.mkdir(parents=True, exist_ok=True)
    token_list = root / "tokens.txt"
    token_list.write_text("\n".join(TOKENS) + "\n")
    parser = asr_task.ASRTask.get_parser()
    argv = ["--token_list", str(token_list), "--token_type", "word", "--encoder", "conformer",
            "--decoder", "transformer", "--output_dir", str(root)]
    if not frontend:
        argv += ["--input_size", str(FEAT_DIM)]
    args = parser.parse_args(argv)
    args.encoder_conf = tiny_conformer_options(num_blocks=2)
    args.decoder_conf = {"num_blocks": 1, "linear_units": 32, "attention_heads": 2}
    args.model_conf = {"ctc_weight": 0.3}
    args.specaug = None
    args.normalize = None
    if frontend:
        args.frontend = "default"
        args.frontend_conf = {"n_fft": 256, "hop_length": 128, "n_mels": FEAT_DIM, "fs": 16000}
    else:
        args.frontend = None
    return args


@pytest.fixture(scope="module")
def toy(asr_task, tmp_path_factory) -> Dict[str, Any]:
    args = _args(asr_task, tmp_path_factory.mktemp("toy"))
    torch.manual_seed(0)
    model = asr_task.ASRTask.build_model(args).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"speech": torch.randn(3, 48, FEAT_DIM, generator=g), "speech_lengths": torch.tensor([48, 40, 33]),
                "text": torch.tensor([[2, 3, 4], [3, 2, -1], [4, -1, -1]]), "text_lengths": torch.tensor([3, 2, 1])}]
    return {"args": args, "model": model, "batches": batches}


@pytest.fixture(scope="module")
def toy_table(toy) -> SensitivityTable:
    return measure(toy["model"], toy["batches"], widths=(0, 1, 2, 3, 4, 6, 8), progress=False)


def test_omega_is_zero_at_full_precision_and_falls_as_bits_grow(toy, toy_table):
    layers = measured_layers(toy["model"])
    assert list(toy_table.names) == list(layers)
    assert any(n.startswith("decoder.") for n in toy_table.names) and any(n.endswith("pointwise_conv1")
                                                                          for n in toy_table.names)
    # 2..8 bits share one grid family (step max|W|/q); 1 bit is sign x mean|W|, often *less*
    # harmful than max-scaled ternary, so it is not ordered against 2 bits
    fp, uniform = toy_table.omega[:, 0], toy_table.omega[:, 2:]
    assert (fp == 0).all()
    assert (toy_table.omega[:, 1:] > 0).all()
    assert (np.diff(uniform, axis=1) < 0).all(), toy_table.omega
    assert toy_table.params == tuple(m.weight.numel() for m in layers.values())
    # weights are restored bit for bit
    again = measure(toy["model"], toy["batches"], widths=(4,), progress=False)
    assert np.array_equal(again.omega[:, 0], toy_table.omega[:, 4])


def test_ctc_target_measures_the_posteriors(toy, toy_table):
    ctc = measure(toy["model"], toy["batches"], widths=(4,), target="ctc", include_decoder=False, progress=False)
    assert all(n.startswith("encoder.") for n in ctc.names)
    assert (ctc.omega > 0).all() and not np.allclose(ctc.omega[:, 0], toy_table.omega[:len(ctc.names), 4])
    with pytest.raises(SensitivityError, match="target 'rnnt' unknown"):
        measure(toy["model"], toy["batches"], target="rnnt")


def test_cache_is_reused_for_the_same_model_and_refused_for_another(toy, asr_task, tmp_path):
    cache = tmp_path / "sens.npz"
    first = load_or_measure(cache, toy["model"], toy["batches"], widths=(2, 4), progress=False, data_id="d")
    assert cache.is_file()
    again = load_or_measure(cache, toy["model"], toy["batches"], widths=(2, 4), progress=False, data_id="d")
    assert np.array_equal(first.omega, again.omega) and again.fingerprint == first.fingerprint
    torch.manual_seed(5)
    other = asr_task.ASRTask.build_model(toy["args"]).eval()
    assert fingerprint(other, a=1) != fingerprint(toy["model"], a=1)
    with pytest.raises(SensitivityError, match="measured on another model or with other options"):
        load_or_measure(cache, other, toy["batches"], widths=(2, 4), progress=False, data_id="d")
    with pytest.raises(SensitivityError, match="other options"):  # other widths: not the same measurement
        load_or_measure(cache, toy["model"], toy["batches"], widths=(2, 8), progress=False, data_id="d")
    cache.write_bytes(b"not a table")
    with pytest.raises(SensitivityError, match="not a readable table"):
        SensitivityTable.load(cache)


def test_emitted_config_builds_a_model_with_the_allocated_bits(toy, toy_table, asr_task):
    problem = toy_table.problem().restrict((2, 3, 4, 8))
    alloc = solve(problem).best_under(Budget(3.5))
    assert len(set(alloc.bits.values())) > 1  # genuinely mixed
    fragment = yaml.safe_load(yaml.safe_dump(config_fragment(alloc.bits, "conformer")))
    assert fragment["encoder"] == "elastic_conformer" and fragment["model"] == "compressed"
    conf = merge_fragment(vars(toy["args"]), fragment)
    args = type(toy["args"])(**conf)
    built = asr_task.ASRTask.build_model(args)
    got = {f"encoder.{n}": m.weight_quantizer.bits for n, m in quantized_modules(built.encoder).items()}
    got.update({f"decoder.{n}": m.weight_quantizer.bits for n, m in quantized_modules(built.decoder).items()})
    assert got == alloc.bits


def test_cli_writes_the_allocation_and_refuses_bad_budgets(asr_task, tmp_path):
    import soundfile

    args = _args(asr_task, tmp_path / "exp", frontend=True)
    torch.manual_seed(0)
    model = asr_task.ASRTask.build_model(args)
    config, ckpt = tmp_path / "exp" / "config.yaml", tmp_path / "exp" / "model.pth"
    config.write_text(yaml.safe_dump(vars(args), sort_keys=False))
    torch.save(model.state_dict(), ckpt)
    data = tmp_path / "dev"
    (data / "wav").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"spk1-u{i}" for i in range(4)]
    for uid in ids:
        soundfile.write(data / "wav" / f"{uid}.wav", rng.normal(0, 0.1, 16000 // 4).astype(np.float32), 16000)
    (data / "wav.scp").write_text("".join(f"{u} {data / 'wav' / (u + '.wav')}\n" for u in ids))
    (data / "text").write_text("".join(f"{u} A B\n" for u in ids))
    (data / "utt2spk").write_text("".join(f"{u} spk1\n" for u in ids))
    out = tmp_path / "mp"
    common = ["--asr_train_config", str(config), "--asr_model_file", str(ckpt), "--data_dir", str(data),
              "--out_dir", str(out), "--widths", "2", "4", "8", "--no_progress", "--batch_size", "3"]
    assert cli.main(common + ["--budget", "1.5"]) == 2 and not out.exists()  # nothing measured or written
    assert cli.main(common + ["--budget", "3", "--budget", "6", "--monotonic"]) == 0
    small = yaml.safe_load((out / "bits_3avg_bits.yaml").read_text())
    big = yaml.safe_load((out / "bits_6avg_bits.yaml").read_text())
    for section in (("encoder_conf", "quant_conf"), ("model_conf", "decoder_quant")):
        s, b = small[section[0]][section[1]]["bits"], big[section[0]][section[1]]["bits"]
        assert s.keys() == b.keys() and all(b[k] >= s[k] for k in s)
    table = (out / "allocation.md").read_text()
    assert "| KL-chosen, budget 3 average bits |" in table and "| uniform 4 bits |" in table
    assert (out / "frontier.png").stat().st_size > 0 and (out / "sensitivity.npz").is_file()
