"""What a user reads after a bit allocation: a table per budget and a plot of the frontier."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from espnet_compress.mixed_precision.allocation import Allocation, Budget, Frontier
from espnet_compress.utils.io import atomic_save_png


def budget_label(budget: Budget) -> str:
    """A file-name-safe label: ``4avg_bits``, ``250000bytes``."""
    return f"{budget.value:g}{budget.unit}"


def allocation_table(frontier: Frontier, budgets: Sequence[Budget], chosen: Sequence[Allocation]) -> str:
    """Markdown: the chosen points and the uniform widths (average bits, bytes of codes, summed
    Omega), then the width of every sub-layer in every chosen allocation."""
    problem = frontier.problem
    lines = ["| allocation | average bits | bytes of codes | sum of Omega (nats) |", "|---|---:|---:|---:|"]
    for budget, alloc in zip(budgets, chosen):
        lines.append(f"| KL-chosen, budget {budget.describe()} | {alloc.avg_bits:.3f} | {alloc.bytes:,.0f} | "
                     f"{alloc.omega:.5g} |")
    for width in sorted(problem.widths):
        uni = problem.uniform(width)
        lines.append(f"| uniform {width or 'fp32'}{' bits' if width else ''} | {uni.avg_bits:.3f} | "
                     f"{uni.bytes:,.0f} | {uni.omega:.5g} |")
    lines += ["", f"Frontier: {len(frontier)} Pareto-optimal allocations of {len(problem.names)} sub-layers over "
              f"widths {list(problem.widths)}.", ""]
    head = "| sub-layer | weights | " + " | ".join(budget_label(b) for b in budgets) + " |"
    lines += [head, "|---|---:|" + "---:|" * len(budgets)]
    for name, params in zip(problem.names, problem.params):
        lines.append(f"| {name} | {params:,} | " + " | ".join(str(a.bits[name]) for a in chosen) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier(frontier: Frontier, chosen: Sequence[Allocation], labels: Sequence[str], path: Path) -> Path:
    """Summed sensitivity vs average bits along the frontier, the chosen and uniform points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problem = frontier.problem
    n = problem.num_weights
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(frontier.total_bits / n, frontier.omega, where="post", label="Pareto frontier (DP)")
    uniform: List[Allocation] = [problem.uniform(w) for w in sorted(problem.widths) if w]
    ax.plot([u.avg_bits for u in uniform], [u.omega for u in uniform], "s", color="grey", label="uniform widths")
    for u, w in zip(uniform, [w for w in sorted(problem.widths) if w]):
        ax.annotate(f"{w} bit", (u.avg_bits, u.omega), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for alloc, label in zip(chosen, labels):
        ax.plot([alloc.avg_bits], [alloc.omega], "*", markersize=12, label=f"chosen: {label}")
    ax.set_yscale("symlog", linthresh=max(1e-6, float(frontier.omega[frontier.omega > 0].min())
                                          if (frontier.omega > 0).any() else 1e-6))
    ax.set_xlabel("average bits per quantized weight")
    ax.set_ylabel("sum of KL sensitivities (nats)")
    ax.set_title("KL-sensitivity bit allocation (eq. 8)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_save_png(fig, path)
