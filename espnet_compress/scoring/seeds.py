"""One comparison repeated with several training seeds: WER mean and spread, one verdict per seed.

A single run per cell cannot separate two methods when seeds disagree (here the foldable depth-4-only
seed scored 96.8% with one seed and 67.7% with another). Each seed's run is a whole comparison
(``compare.json`` as :func:`~espnet_compress.scoring.compare.compare` writes it); this module lines
the runs up system by system and says plainly whether the per-seed MAPSSWE verdicts agree.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Dict, List, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class SeedRow:
    """One system across seeds: WER and verdict (against that run's baseline) per seed."""

    system: str
    wers: Dict[str, float]
    verdicts: Dict[str, str]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.wers.values())

    @property
    def spread(self) -> float:
        """Sample standard deviation (0 with one seed: no spread measured)."""
        return statistics.stdev(self.wers.values()) if len(self.wers) > 1 else 0.0

    @property
    def agree(self) -> bool:
        return len(set(self.verdicts.values())) == 1


@dataclasses.dataclass(frozen=True)
class SeedTable:
    baseline: str
    test_set: str
    seeds: List[str]
    rows: List[SeedRow]

    def to_markdown(self) -> str:
        head = ("| system | " + " | ".join(f"WER {s}" for s in self.seeds) + " | mean | sd | verdict per seed "
                f"(vs `{self.baseline}`) | agree |")
        lines = [head, "|---|" + "---:|" * (len(self.seeds) + 2) + "---|---|"]
        for row in self.rows:
            wers = " | ".join(f"{row.wers[s]:.2f}" if s in row.wers else "-" for s in self.seeds)
            verdicts = "; ".join(f"{s}: {row.verdicts[s]}" for s in self.seeds if s in row.verdicts)
            lines.append(f"| {row.system} | {wers} | {row.mean:.2f} | {row.spread:.2f} | {verdicts} | "
                         f"{'yes' if row.agree else 'NO'} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> Dict[str, object]:
        return {"baseline": self.baseline, "test_set": self.test_set, "seeds": self.seeds,
                "rows": [{"system": r.system, "wers": r.wers, "verdicts": r.verdicts, "mean": r.mean,
                          "sd": r.spread, "verdicts_agree": r.agree} for r in self.rows]}


def seed_table(runs: Mapping[str, Mapping[str, object]], test_set: str = "test") -> SeedTable:
    """Line up ``compare.json`` contents (seed label -> parsed file) of one comparison.

    Every run must have the same baseline and the same systems: a run missing a system is an
    unfinished run, not a smaller sample, and is refused by name.
    """
    if not runs:
        raise ValueError("no runs to line up")
    seeds = list(runs)
    baselines = {seed: run["baseline"] for seed, run in runs.items()}
    if len(set(baselines.values())) != 1:
        raise ValueError(f"the runs have different baselines: {baselines}")
    systems = {seed: [s["name"] for s in run["systems"]] for seed, run in runs.items()}  # type: ignore[index]
    first = systems[seeds[0]]
    for seed, names in systems.items():
        if names != first:
            raise ValueError(f"run {seed!r} has systems {names}, run {seeds[0]!r} has {first}")
    rows: List[SeedRow] = []
    for i, name in enumerate(first):
        wers, verdicts = {}, {}
        for seed, run in runs.items():
            cell = run["systems"][i]["test_sets"][test_set]  # type: ignore[index]
            wers[seed] = float(cell["wer"]["wer"])
            verdicts[seed] = str(cell["verdict"])
        rows.append(SeedRow(name, wers, verdicts))
    return SeedTable(str(baselines[seeds[0]]), test_set, seeds, rows)


def collect(run_dirs: Sequence[Path]) -> Dict[str, Dict[str, Dict[str, object]]]:
    """``compare.json`` files under each run dir, grouped by their path inside the run:
    ``{relative path: {run dir name: parsed file}}``; a comparison missing from a run is refused."""
    found: Dict[str, Dict[str, Dict[str, object]]] = {}
    for run in run_dirs:
        run = Path(run)
        files = sorted(run.rglob("compare.json"))
        if not files:
            raise FileNotFoundError(f"{run}: no compare.json below it (has the run been scored?)")
        for path in files:
            found.setdefault(str(path.parent.relative_to(run)), {})[run.name] = json.loads(path.read_text())
    for rel, runs in found.items():
        missing = [Path(r).name for r in run_dirs if Path(r).name not in runs]
        if missing:
            raise ValueError(f"comparison {rel!r} is missing from run(s) {missing}")
    return found
