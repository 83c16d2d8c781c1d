"""Derive the searched architecture from a DARTS supernet (``encoder_conf.search``) as a plain model.

The argmax of every FFN's ``alpha`` is written as a config whose ``encoder_conf.search.fixed`` holds
the per-block widths and bottlenecks (ESPnet's ``ConformerEncoder`` has one ``linear_units`` for all
blocks, so per-block and per-FFN sizes need the plugin's encoder), plus the supernet's weights cut
to those sizes (the first units of every nested candidate): a checkpoint for
``asr_train --init_param`` fine-tuning or for decoding as it is. A uniform, unfactorised answer
(every FFN at one width) is a stock ``conformer`` with ``linear_units`` = that width, which loads
without this plugin.

The derived model computes exactly what the supernet computes with one-hot architecture weights
at the pick; :func:`derive_search` checks it on a random input before writing the checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Set, Tuple, Union

import torch
import yaml

from espnet_compress.features.search import ARCH_MODULE, SearchFeature, search_feature
from espnet_compress.models.compressed_asr import multi_system_options
from espnet_compress.utils.io import atomic_write_bytes, atomic_write_text
from espnet_compress.utils.params import count_parameters, model_state

log = logging.getLogger(__name__)

#: what derive_search records next to the model
RECORD = "derive.json"
#: largest |supernet - derived| encoder output difference accepted by the self-check
TOLERANCE = 1e-4
#: keys of an ESPnet run's config.yaml that belong to that run, not to the model: a derived config
#: given to asr_train with new data would otherwise *append* the search's data and shapes
RUN_KEYS = ("output_dir", "train_data_path_and_name_and_type", "valid_data_path_and_name_and_type",
            "train_shape_file", "valid_shape_file", "init_param", "freeze_param")
#: training-schedule keys the derived model takes from the supernet's (stage-1) config
SCHEDULE_KEYS = ("max_epoch", "patience", "early_stopping_criterion", "optim", "optim_conf", "scheduler",
                 "scheduler_conf")


@dataclasses.dataclass(frozen=True)
class DerivedModel:
    """What :func:`derive_search` wrote."""

    config: Path
    model_file: Path
    stock: bool  # a stock ESPnet conformer (loads without espnet_compress)
    architecture: Dict[str, Dict[str, list]]
    num_params: int
    supernet_params: int
    max_abs_diff: float


def derived_config(train_config: Mapping[str, Any], feature: SearchFeature, encoder: torch.nn.Module,
                   architecture: Mapping[str, Mapping[str, list]]) -> Tuple[Dict[str, Any], bool]:
    """The supernet's training config rewritten for the derived model; second value: stock or not.

    Stage options (``freeze_param``, ``init_param``, the search's stage/held-out/penalty) are dropped:
    the derived model trains like any model.
    """
    conf = copy.deepcopy(dict(train_config))
    for key in [k for k in conf if k in RUN_KEYS or k not in training_options()]:
        conf.pop(key, None)
    enc = conf.setdefault("encoder_conf", {})
    widths = {w for per_block in architecture["width"].values() for w in per_block}
    factorised = "rank" in architecture
    others = [k for k in encoder.BUILD_ONLY_OPTIONS if k in enc and k != SearchFeature.KEY]
    model_conf = conf.get("model_conf", {}) or {}
    stock = (len(widths) == 1 and not factorised and not others and encoder.STOCK_ENCODER is not None
             and "decoder_quant" not in model_conf)
    enc.pop(SearchFeature.KEY, None)
    if stock:
        conf["encoder"] = encoder.STOCK_ENCODER
        enc[encoder.SHAPE_OPTIONS[1]] = next(iter(widths))
        dropped = set(multi_system_options())
        conf["model"] = "espnet"
        conf["model_conf"] = {k: v for k, v in model_conf.items() if k not in dropped}
        return conf, True
    search: Dict[str, Any] = {"fixed": {k: {n: list(v) for n, v in per.items()} for k, per in architecture.items()}}
    if factorised:
        search["semi_orthogonal"] = feature.semi_orthogonal
        search["orthogonal_every"] = feature.orthogonal_every
    enc[SearchFeature.KEY] = search
    conf["encoder"] = f"elastic_{encoder.FAMILY}"
    return conf, False


def training_options() -> Set[str]:
    """Keys a training config may hold: ``asr_train``'s options, without ``config``/``print_config``
    (an ESPnet run's ``config.yaml`` also records argparse's ``required`` list, which asr_train
    refuses as a config key)."""
    from espnet2.tasks.asr import ASRTask

    return {a.dest for a in ASRTask.get_parser()._actions} - {"config", "print_config", "help"}


def schedule_source(train_config: Mapping[str, Any]) -> Optional[Path]:
    """The stage-1 config of a stage-2 run: ``config.yaml`` beside the checkpoint its ``init_param``
    loaded (stage 2's own schedule trains alpha, not a network)."""
    init = train_config.get("init_param") or []
    for entry in [init] if isinstance(init, str) else init:
        candidate = Path(str(entry).split(":", 1)[0]).parent / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def derive_search(train_config: Union[str, Path], model_file: Union[str, Path], out_dir: Union[str, Path],
                  pick: Optional[Mapping[str, Mapping[str, int]]] = None,
                  schedule_config: Optional[Union[str, Path]] = None) -> DerivedModel:
    """Write ``out_dir/config.yaml``, ``out_dir/model.pth`` and ``out_dir/derive.json`` for the argmax
    architecture of the supernet (or ``pick``: candidate indices per FFN key, as
    :meth:`SearchFeature.pick` returns them).

    The derived config trains with the schedule (epochs, optimiser, scheduler) of ``schedule_config``,
    by default the stage-1 run's config found through the stage-2 run's ``init_param``; without
    either, the given config's own schedule is kept (and a warning says so)."""
    from espnet2.tasks.asr import ASRTask

    train_config, out_dir = Path(train_config), Path(out_dir)
    model, _ = ASRTask.build_model_from_file(train_config, model_file, "cpu")
    feature = search_feature(model.encoder)
    if feature is None or not feature.searching:
        raise ValueError(f"{train_config}: the encoder has no encoder_conf.search with candidates; nothing to derive")
    pick = feature.pick() if pick is None else pick
    architecture = feature.architecture(pick)
    raw = yaml.safe_load(train_config.read_text())
    conf, stock = derived_config(raw, feature, model.encoder, architecture)
    source = Path(schedule_config) if schedule_config is not None else schedule_source(raw)
    if source is not None:
        schedule = yaml.safe_load(source.read_text())
        for key in SCHEDULE_KEYS:
            conf.pop(key, None)
            if key in schedule:
                conf[key] = schedule[key]
    else:
        log.warning("%s: no stage-1 config found (init_param); the derived config keeps this config's schedule "
                    "(give schedule_config for fine-tuning)", train_config)
    state = feature.derived_state(model.state_dict(), model.encoder, pick)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.yaml"
    atomic_write_text(config_path, yaml.safe_dump(conf, sort_keys=False))
    derived, _ = ASRTask.build_model_from_file(config_path, None, "cpu")
    derived.load_state_dict(state, strict=True)
    diff = _max_encoder_diff(model, derived, feature, pick, raw)
    if diff > TOLERANCE:
        raise RuntimeError(f"derived model differs from the supernet at its pick by {diff:.3g} (internal error)")
    buf = io.BytesIO()
    torch.save(derived.state_dict(), buf)
    model_path = out_dir / "model.pth"
    atomic_write_bytes(model_path, buf.getvalue())
    result = DerivedModel(config_path, model_path, stock, architecture, count_parameters(derived),
                          count_parameters(model), diff)
    record = {"source_config": str(train_config), "source_model": str(model_file), "stock": stock,
              "schedule_from": None if source is None else str(source),
              "architecture": architecture, "num_params": result.num_params,
              "supernet_params": result.supernet_params, "max_abs_diff": diff,
              "pick": {k: dict(v) for k, v in pick.items()}}
    atomic_write_text(out_dir / RECORD, json.dumps(record, indent=2) + "\n")
    log.info("derived %s (%d parameters, supernet %d) into %s", "stock conformer" if stock else conf["encoder"],
             result.num_params, result.supernet_params, out_dir)
    return result


@torch.no_grad()
def _max_encoder_diff(supernet: torch.nn.Module, derived: torch.nn.Module, feature: SearchFeature,
                      pick: Mapping[str, Mapping[str, int]], conf: Mapping[str, Any]) -> float:
    """Largest |difference| of the encoder outputs on one random input, supernet pinned to ``pick``."""
    supernet.eval()
    derived.eval()
    gen = torch.Generator().manual_seed(0)
    if supernet.frontend is None:
        speech = torch.randn(1, 64, int(conf.get("input_size") or 80), generator=gen)
        lengths = torch.tensor([64])
    else:
        speech, lengths = torch.randn(1, 16000, generator=gen), torch.tensor([16000])
    with feature.pinned(pick):
        a, _ = supernet.encode(speech, lengths)
    b, _ = derived.encode(speech, lengths)
    return float((a - b).abs().max())


def warm_start_search(dense_config: Union[str, Path], dense_model: Union[str, Path],
                      search_config: Union[str, Path], out_file: Union[str, Path]) -> Path:
    """Write ``out_file``: the trained dense model of ``dense_config``/``dense_model`` (e.g. the fp32
    baseline) in the layout of the supernet ``search_config`` builds, for stage 1's
    ``asr_train --init_param`` (:meth:`SearchFeature.warm_start_state`: width prefixes, truncated-SVD
    factors for the bottlenecks).

    The supernet is built from ``dense_config`` with the network choices of ``search_config`` (each of
    ASRTask's class choices and its ``*_conf``): the rest -- token list, input size -- is the dense run's,
    the one its weights were trained with, already parsed by ``asr_train`` (the recipe YAML is not). The
    result must fill every supernet tensor except the search's own ``alpha`` and counters; anything
    else missing or left over means the two configs describe different networks, and nothing is
    written.
    """
    from espnet2.tasks.asr import ASRTask

    dense_config, search_config, out_file = Path(dense_config), Path(search_config), Path(out_file)
    conf = yaml.safe_load(dense_config.read_text())
    overlay = yaml.safe_load(search_config.read_text())
    network = {c.name for c in ASRTask.class_choices_list}
    network |= {f"{name}_conf" for name in network}
    conf.update({k: v for k, v in overlay.items() if k in network})
    conf["normalize"] = None  # its statistics file path is the dense run's; the buffers come from dense_model
    model = ASRTask.build_model(argparse.Namespace(**conf))
    feature = search_feature(model.encoder)
    if feature is None:
        raise ValueError(f"{search_config}: encoder_conf has no search block; nothing to warm-start")
    dense = model_state(torch.load(dense_model, map_location="cpu", weights_only=True))
    state = feature.warm_start_state(dense, model.encoder)
    own = {k: v for k, v in state.items() if not k.startswith("normalize.")}
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [k for k in missing if not k.startswith(f"encoder.{ARCH_MODULE}.")]
    if missing or unexpected:
        raise ValueError(f"{dense_model} does not fit the supernet of {search_config}: missing {missing[:3]} "
                         f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)}); the dense model must "
                         f"have the supernet's host network (encoder_conf other than search, decoder, vocabulary)")
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out_file, buf.getvalue())
    log.info("warm start for %s from %s written to %s", search_config, dense_model, out_file)
    return out_file
