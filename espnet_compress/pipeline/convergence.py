"""Training curves and the one stopping rule every baseline and twin is trained with.

A verdict "compressed is as good as fp32" only means something when both sides were trained to the
same rule. The rule here is ESPnet's own early stopping (``patience`` epochs without improvement of
``early_stopping_criterion``, capped by ``max_epoch``), set in the training configs, so stock
``asr_train`` applies it and every recipe run stops where the benchmarks do. This module reads the
curves back (from the checkpoint's reporter, which survives a resumed run, or from ``train.log``),
replays the rule through ESPnet's own ``Reporter`` to say at which epoch it stops, and plots the
curves a reader wants to see before trusting a table: did the baseline reach its plateau?
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

#: epoch -> {"train": {...}, "valid": {...}}: what ESPnet's reporter logs at the end of each epoch
Curve = Dict[int, Dict[str, Dict[str, float]]]

#: ESPnet's defaults (espnet2/tasks/abs_task.py), used when a config leaves the option out
ESPNET_DEFAULT_CRITERION = ("valid", "loss", "min")
ESPNET_DEFAULT_MAX_EPOCH = 40

_RESULTS = re.compile(r"(\d+)epoch results: (.*)$")
_SECTION = re.compile(r"\[(\w+)\] ([^\[]*)")
#: keys the reporter computes itself and refuses to be given
_RESERVED = ("time", "total_count")
_STOPPED = re.compile(r"\[Early stopping\].* stopped at (\d+)epoch")


@dataclasses.dataclass(frozen=True)
class StoppingRule:
    """ESPnet's stopping options of one training config.

    Attributes:
        patience: epochs without improvement before stopping; None = train ``max_epoch`` epochs.
        criterion: ``(phase, key, "min"|"max")``, e.g. ``("valid", "acc", "max")``.
        max_epoch: the cap.
    """

    patience: Optional[int]
    criterion: Tuple[str, str, str]
    max_epoch: int

    @classmethod
    def from_config(cls, conf: Mapping[str, Any]) -> "StoppingRule":
        """The rule ``asr_train`` applies for this config (ESPnet's defaults for missing options)."""
        patience = conf.get("patience")
        criterion = tuple(conf.get("early_stopping_criterion") or ESPNET_DEFAULT_CRITERION)
        if len(criterion) != 3 or criterion[2] not in ("min", "max"):
            raise ValueError(f"early_stopping_criterion: expected [phase, key, min|max], got {list(criterion)}")
        return cls(None if patience in (None, "none") else int(patience), criterion,  # type: ignore[arg-type]
                   int(conf.get("max_epoch", ESPNET_DEFAULT_MAX_EPOCH)))

    def describe(self) -> str:
        phase, key, mode = self.criterion
        if self.patience is None:
            return f"{self.max_epoch} epochs (no early stopping)"
        return f"stop after {self.patience} epochs without a new {mode} of {phase} {key}, at most {self.max_epoch}"

    def stop_epoch(self, curve: Curve) -> int:
        """The last epoch ``asr_train`` runs under this rule, given the logged curve.

        Replayed through ESPnet's own :class:`~espnet2.train.reporter.Reporter` (the object the
        trainer asks after every epoch), so ties and the meaning of ``patience`` are exactly ESPnet's.
        A curve that ends before the rule stops (an interrupted run) returns its last epoch.
        """
        from espnet2.train.reporter import Reporter

        phase, key, mode = self.criterion
        reporter = Reporter()
        for epoch in sorted(curve):
            if epoch > self.max_epoch:
                break
            reporter.set_epoch(epoch)
            for name, values in curve[epoch].items():
                with reporter.observe(name) as sub:
                    sub.register({k: float(v) for k, v in values.items() if k not in _RESERVED})
            if self.patience is not None and reporter.has(phase, key) and \
                    reporter.check_early_stopping(self.patience, phase, key, mode, logger=_Quiet()):
                return epoch
        return min(max(curve), self.max_epoch)

    def best_epoch(self, curve: Curve) -> int:
        """The epoch whose checkpoint the rule keeps (ESPnet's ``valid.<key>.best``), among the
        epochs run before stopping; ties go to the earliest, as in ESPnet's sort."""
        phase, key, mode = self.criterion
        last = self.stop_epoch(curve)
        epochs = [e for e in sorted(curve) if e <= last and key in curve[e].get(phase, {})]
        if not epochs:
            raise ValueError(f"the curve has no {phase} {key}")
        sign = -1.0 if mode == "max" else 1.0
        return min(epochs, key=lambda e: (sign * curve[e][phase][key], e))


class _Quiet:
    """A logger for the replay: ESPnet's message belongs to the real run's log, not to a report."""

    def info(self, *args: Any, **kwargs: Any) -> None:
        pass


def curve_from_log(text: str) -> Curve:
    """Parse the ``<N>epoch results: [train] k=v, ... [valid] k=v, ...`` lines of a ``train.log``."""
    curve: Curve = {}
    for line in text.splitlines():
        match = _RESULTS.search(line)
        if not match:
            continue
        sections: Dict[str, Dict[str, float]] = {}
        for name, body in _SECTION.findall(match.group(2)):
            values: Dict[str, float] = {}
            for item in body.split(","):
                k, sep, v = item.strip().partition("=")
                if sep:
                    try:
                        values[k] = float(v)
                    except ValueError:
                        continue  # durations such as time=1 minute and 3.2 seconds
            sections[name] = values
        curve[int(match.group(1))] = sections
    return curve


def stopped_epoch_from_log(text: str) -> Optional[int]:
    """The epoch ESPnet says it stopped at early, or None if it did not stop early."""
    found = _STOPPED.findall(text)
    return int(found[-1]) if found else None


def curve_from_checkpoint(path: Path) -> Curve:
    """The full curve kept in ESPnet's ``checkpoint.pth`` (complete even when the run was resumed
    and ``train.log`` was rewritten)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    curve: Curve = {}
    for epoch, phases in state["reporter"]["stats"].items():
        curve[int(epoch)] = {
            phase: {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) or hasattr(v, "item")}
            for phase, values in phases.items() if isinstance(values, Mapping)
        }
    return curve


def read_curve(exp_dir: Path) -> Curve:
    """The training curve of an ESPnet experiment dir: checkpoint first, ``train.log`` otherwise."""
    exp_dir = Path(exp_dir)
    if (exp_dir / "checkpoint.pth").exists():
        return curve_from_checkpoint(exp_dir / "checkpoint.pth")
    if (exp_dir / "train.log").exists():
        return curve_from_log((exp_dir / "train.log").read_text(errors="replace"))
    raise FileNotFoundError(f"{exp_dir}: no checkpoint.pth or train.log to read a training curve from")


@dataclasses.dataclass(frozen=True)
class TrainingSummary:
    """What one ESPnet training ran: the facts a table needs beside each verdict."""

    rule: StoppingRule
    epochs: int
    kept_epoch: int
    updates: int

    def describe(self) -> str:
        return f"{self.epochs} epochs (kept {self.kept_epoch}), {self.updates} updates"


def training_summary(exp_dir: Path) -> TrainingSummary:
    """Epochs run, the epoch whose checkpoint is kept and the optimizer updates (ESPnet's cumulative
    ``total_count``) of the training in ``exp_dir``, under the rule of its ``config.yaml``."""
    import yaml

    exp_dir = Path(exp_dir)
    curve = read_curve(exp_dir)
    rule = StoppingRule.from_config(yaml.safe_load((exp_dir / "config.yaml").read_text()))
    last = rule.stop_epoch(curve)
    return TrainingSummary(rule, last, rule.best_epoch(curve), int(curve[last].get("train", {}).get("total_count", 0)))


def plot_curves(curves: Mapping[str, Curve], path: Path, rule: Optional[StoppingRule] = None,
                key: Tuple[str, str] = ("valid", "acc")) -> Path:
    """Dev accuracy (or ``key``) per epoch of each run, the rule's stop and best epochs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from espnet_compress.utils.io import atomic_save_png

    phase, name = key
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        epochs = [e for e in sorted(curve) if name in curve[e].get(phase, {})]
        line, = ax.plot(epochs, [curve[e][phase][name] for e in epochs], marker=".", label=label)
        if rule is not None and epochs:
            best = rule.best_epoch(curve)
            ax.plot([best], [curve[best][phase][name]], marker="*", markersize=12, color=line.get_color())
            ax.axvline(rule.stop_epoch(curve), color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{phase} {name}")
    title = f"{phase} {name} per epoch"
    if rule is not None:
        title += f"\n{rule.describe()} (star: kept checkpoint, dotted: stop)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_save_png(fig, path)


def curve_table(curve: Curve, keys: Sequence[Tuple[str, str]] = (("valid", "acc"), ("valid", "loss"))) -> str:
    """A markdown table of the curve: epoch, updates so far (ESPnet's cumulative ``total_count``),
    and the given keys."""
    head = "| epoch | updates | " + " | ".join(f"{p} {k}" for p, k in keys) + " |"
    rows = [head, "|" + "---|" * (2 + len(keys))]
    for epoch in sorted(curve):
        count = curve[epoch].get("train", {}).get("total_count")
        cells = [f"{curve[epoch].get(p, {}).get(k, float('nan')):.4f}" for p, k in keys]
        rows.append(f"| {epoch} | {int(count) if count is not None else '?'} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
