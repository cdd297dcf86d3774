"""What a run shows and records: the rank-0 progress bar, DeepSpeed monitor events, expert load,
``history.jsonl``, ``metrics.json`` and a loss-curve PNG."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.moe.sharded_moe import MOELayer
from tqdm import tqdm

from moge_ds.distributed import collective_device
from moge_ds.gate import moge_gates
from moge_ds.topographic import map_neighbours, top2_neighbour_rate

log = logging.getLogger("moge_ds")


def gate_terms(model: torch.nn.Module) -> dict[str, float]:
    """This rank's last forward: the mean over MoE layers of the load-balance and group-sparsity
    losses, the current sigma, and per layer how often a token's top-2 noise-free scores are map
    neighbours (``top2_neighbour_rate/layer{i}``, next to its chance level)."""
    gates = moge_gates(model)
    if not gates:
        return {}
    terms = {"load_balance_loss": sum(g.last_load_balance_loss.item() for g in gates) / len(gates),
             "sigma": gates[0].sigma}
    if gates[0].last_group_sparsity_loss is not None:
        terms["group_sparsity_loss"] = sum(g.last_group_sparsity_loss.item() for g in gates) / len(gates)
    scores = [gate.last_scores for gate in gates if gate.last_scores is not None]
    return {**terms, **neighbour_terms(scores, gates[0].map_shape, gates[0].padding == "circular")}


def neighbour_terms(scores: list[torch.Tensor], map_shape: tuple[int, int], circular: bool) -> dict[str, float]:
    """Per layer, how often a token's two highest noise-free ``scores`` ``[T, E]`` are map neighbours
    (``top2_neighbour_rate/layer{i}``), and that rate by chance (``top2_neighbour_chance``)."""
    terms = {}
    for i, layer_scores in enumerate(scores):
        if layer_scores.shape[1] > 2:
            neighbours = map_neighbours(map_shape, circular).to(layer_scores.device)
            rate, chance = top2_neighbour_rate(layer_scores, neighbours)
            terms[f"top2_neighbour_rate/layer{i}"] = rate
            terms["top2_neighbour_chance"] = chance
    return terms


def gather_expert_load(model: torch.nn.Module) -> list[torch.Tensor]:
    """Per MoE layer, the fraction of routed tokens each expert received in the last forward, over all ranks.

    Collective: every rank must call it.
    """
    return reduce_expert_counts([m.exp_counts for m in model.modules() if isinstance(m, MOELayer)])


def reduce_expert_counts(counts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, this rank's token counts per expert ``[E]`` summed over ranks, as fractions.

    Collective: every rank must call it, with as many layers.
    """
    loads = []
    for layer_counts in counts:
        total = layer_counts.detach().to(collective_device(), torch.float64, copy=True)
        if dist.is_initialized():
            dist.all_reduce(total)
        loads.append((total / total.sum().clamp(min=1)).cpu())
    return loads


def coefficient_of_variation(load: torch.Tensor) -> float:
    return (load.std(unbiased=False) / load.mean()).item() if load.mean() > 0 else 0.0


class RunLog:
    """Rank 0 writes; other ranks only take part in the collectives."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, unit: str, engine=None):
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.output_dir, self.unit, self.engine = output_dir, unit, engine
        self.records: list[dict] = []
        self.history_path = output_dir / "history.jsonl"
        if self.rank0:
            # A resumed run rewrites what the interrupted one logged after its last checkpoint.
            kept = [r for r in read_history(self.history_path) if r["step"] <= start_step]
            self.history_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not self.rank0,
                        dynamic_ncols=True, mininterval=2.0)
        self._window_start, self._window_items = time.perf_counter(), 0

    def count(self, items: int) -> None:
        self._window_items += items

    def step(self, step: int, scalars: dict[str, float], loads: list[torch.Tensor] | None) -> None:
        """Record ``scalars`` for ``step``; ``loads`` (from :func:`gather_expert_load`) adds per-layer CV."""
        elapsed = time.perf_counter() - self._window_start
        world = dist.get_world_size() if dist.is_initialized() else 1
        scalars = dict(scalars)
        scalars[f"{self.unit}_per_s"] = self._window_items * world / max(elapsed, 1e-9)
        if torch.cuda.is_available():  # this rank's peak since the start (host memory is not tracked)
            scalars["gpu_memory_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        self._window_start, self._window_items = time.perf_counter(), 0
        for i, load in enumerate(loads or []):
            scalars[f"expert_load_cv/layer{i}"] = coefficient_of_variation(load)
        if not self.rank0:
            return
        record = {"step": step, **scalars}
        self.records.append(record)
        with open(self.history_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.engine is not None and self.engine.monitor.enabled:
            self.engine.monitor.write_events([(f"Train/{k}", v, step) for k, v in scalars.items()])
        shown = {k: scalars[k] for k in ("loss", "load_balance_loss", "group_sparsity_loss", "sigma", "lr")
                 if k in scalars}
        self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in shown.items()},
                              f"{self.unit}/s": f"{scalars[f'{self.unit}_per_s']:,.0f}"}, refresh=False)

    def eval(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.rank0:
            return
        record = {"step": step, "split": split, **metrics}
        with open(self.history_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.engine is not None and self.engine.monitor.enabled:
            self.engine.monitor.write_events([(f"Eval/{split}_{k}", v, step) for k, v in metrics.items()])
        self.bar.write(f"step {step} {split}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def read_history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_loss_curve(history: list[dict], path: Path, title: str) -> None:
    """Training loss (and each aux term) against step, with evaluation points, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if "split" not in r]
    evals = [r for r in history if r.get("split") == "valid"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([r["step"] for r in train], [r["task_loss"] for r in train], label="train task loss")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="valid loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    # The two terms live on different scales: one axis each.
    for axis, key, colour in ((axes[1], "load_balance_loss", "tab:blue"),
                              (axes[1].twinx(), "group_sparsity_loss", "tab:orange")):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            axis.plot(*zip(*points), color=colour)
            axis.set_ylabel(key, color=colour)
    axes[1].set_xlabel("step")
    axes[1].set_title("auxiliary terms (mean over MoE layers)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
