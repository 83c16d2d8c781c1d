"""Per-system batch-norm statistics: each system normalises with the statistics of its own
computation, in training (with and without shared computation), at decode time and in export."""
from __future__ import annotations

import copy

import pytest
import torch

from espnet_compress.core.norm_stats import SystemBatchNorm
from tests.test_nested import SYSTEMS, batch, build


def _norms(model):
    return [m for m in model.encoder.modules() if isinstance(m, SystemBatchNorm)]


def _reset(model) -> None:
    for norm in _norms(model):
        norm.reset_running_stats()
        for slot in norm.slots.values():
            slot.running_mean.zero_(), slot.running_var.fill_(1.0), slot.num_batches_tracked.zero_()


def _system_stats(model, system: str):
    """(mean, var, count) each norm keeps for ``system`` (first use of every block it runs)."""
    plan, out = model.systems[system].plan, []
    for block, norm in enumerate(_norms(model)):
        if block not in plan.blocks:
            out.append(None)  # no slot: the system never runs this block
            continue
        slot = model.encoder.blocks.stats_slot(plan, block, 0)
        buffers = norm if slot is None else norm.slots[slot]
        out.append((buffers.running_mean.clone(), buffers.running_var.clone(), int(buffers.num_batches_tracked)))
    return out


@pytest.mark.parametrize("share", [True, False])
def test_every_system_keeps_the_statistics_of_its_own_computation(asr_task, tmp_path, share):
    """After K multi-system steps (no optimizer step, so every computation repeats), each
    system's statistics equal those of K steps of that system on its own (stock forward)."""
    model = build(asr_task, tmp_path, share_computation=share)
    _reset(model)
    alone = copy.deepcopy(model)
    model.train()
    steps = 3
    for _ in range(steps):
        model(**batch())
    alone.train()
    for system in SYSTEMS:
        with alone.system(system):
            for _ in range(steps):
                super(type(alone), alone).forward(**batch())
        for block, (got, want) in enumerate(zip(_system_stats(model, system), _system_stats(alone, system))):
            if got is None:
                assert system == "shallow" and block == 1 and want is None
                continue
            torch.testing.assert_close(got[0], want[0], msg=f"{system} block {block} mean")
            torch.testing.assert_close(got[1], want[1], msg=f"{system} block {block} var")
            assert got[2] == want[2] == steps


def test_the_largest_systems_statistics_move_once_per_step(asr_task, tmp_path):
    """Companions must not update the largest system's (the norms' own) buffers."""
    model = build(asr_task, tmp_path)
    model.train()
    model(**batch())
    assert all(int(n.num_batches_tracked) == 1 for n in _norms(model))
    assert set(_norms(model)[0].slots) == {"shallow", "narrow", "int4"}


def test_each_system_decodes_with_its_own_statistics(asr_task, tmp_path):
    model = build(asr_task, tmp_path)
    model.train()
    model(**batch())
    model.eval()
    b = batch()
    with torch.no_grad(), model.system("narrow"):
        own = model.encode(b["speech"], b["speech_lengths"])[0]
        for norm in _norms(model):  # give 'narrow' the largest system's statistics instead
            norm.slots["narrow"].load_state_dict({k: getattr(norm, k) for k in norm.slots["narrow"].state_dict()})
        other = model.encode(b["speech"], b["speech_lengths"])[0]
    assert not torch.allclose(own, other)


def test_repeated_blocks_keep_statistics_per_use(asr_task, tmp_path):
    from tests.test_foldable import FOLD_ENC

    systems = {"deep": {"depth": 4}, "seed": {"depth": 2}}
    model = build(asr_task, tmp_path, encoder="foldable_conformer", enc=FOLD_ENC, systems=systems, decoder_quant=None)
    assert model.encoder.plan.blocks == (0, 0, 1, 1)
    assert set(_norms(model)[0].slots) == {"deep__use1", "seed"}
    model.train()
    model(**batch())
    norm = _norms(model)[0]
    assert not torch.allclose(norm.running_mean, norm.slots["deep__use1"].running_mean)


def test_an_ad_hoc_plan_uses_the_largest_systems_statistics_and_says_so(asr_task, tmp_path, caplog):
    model = build(asr_task, tmp_path)
    with caplog.at_level("WARNING"):
        with model.encoder.using({"blocks": [1, 2], "name": "adhoc"}):
            assert model.encoder.blocks.stats_slot(model.encoder.plan, 1, 0) is None
    assert "plan 'adhoc' has no batch-norm statistics of its own" in caplog.text


def test_system_names_must_fit_state_dict_keys(asr_task, tmp_path):
    from espnet_compress.models.systems import SystemSpecError

    with pytest.raises(SystemSpecError, match=r"model_conf.systems.a\.b: a system name may contain only"):
        build(asr_task, tmp_path, systems={"full": {}, "a.b": {"blocks": [0]}})
