"""A sweep definition: preset, ds_config, common overrides, grid, arms, seeds; and its runs."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


class SweepError(ValueError):
    """A bad sweep file; the message names the file and the problem."""


@dataclass(frozen=True)
class Run:
    point: tuple[tuple[str, object], ...]  # grid values, e.g. (("moe.num_experts", 16), ("moe.top_k", 1))
    arm: str
    seed: int

    @property
    def name(self) -> str:
        values = "_".join(f"{key.split('.')[-1]}{value}" for key, value in self.point)
        return f"{values}_{self.arm}_s{self.seed}"


@dataclass
class Sweep:
    name: str
    preset: str
    ds_config: str
    metric: str  # a key of metrics.json's split section: accuracy, perplexity, loss
    higher_is_better: bool
    report_split: str  # "test" for results, "valid" for tuning
    baseline: str
    common: list[str]
    grid: dict[str, list]
    arms: dict[str, list[str]]
    seeds: list[int]
    nproc: int = 1
    # Seeds whose runs chose this sweep's arm on validation earlier: the report also gives the
    # paired differences over the other (fresh) seeds alone, the only ones free of that selection.
    selection_seeds: list[int] = dataclasses.field(default_factory=list)

    @classmethod
    def load(cls, path: str) -> "Sweep":
        if not Path(path).is_file():
            raise SweepError(f"sweep file {path} does not exist (the sweeps are under experiments/)")
        spec = yaml.safe_load(Path(path).read_text())
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(spec or {}) - set(fields)) if isinstance(spec, dict) else ["(not a mapping)"]
        if unknown:
            raise SweepError(f"{path}: unknown keys {unknown}; a sweep has {fields}")
        try:
            sweep = cls(**spec)
        except TypeError as err:
            raise SweepError(f"{path}: {err}") from None
        if sweep.baseline not in sweep.arms:
            raise SweepError(f"{path}: baseline {sweep.baseline!r} is not one of the arms {list(sweep.arms)}")
        return sweep

    @property
    def root(self) -> Path:
        return REPO / "results" / self.name

    def runs(self) -> list[Run]:
        keys = list(self.grid)
        points = [tuple(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
        # Seed-major order: a sweep stopped early still has complete seeds for every point.
        return [Run(p, arm, seed) for seed in self.seeds for p in points for arm in self.arms]

    def command(self, run: Run, port: int) -> list[str]:
        overrides = [*self.common, *(f"{k}={v}" for k, v in run.point), *self.arms[run.arm],
                     f"train.seed={run.seed}", f"train.output_dir={self.root / 'runs' / run.name}"]
        return [str(REPO / "launch/train.sh"), "--nproc", str(self.nproc), "--master-port", str(port),
                "--config", str(REPO / self.preset), "--ds-config", str(REPO / self.ds_config), "--",
                "--resume", "--set", *overrides]
