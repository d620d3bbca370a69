"""The figures, from report.collect's numbers (every point with its 95% CI):

trajectory.png: the persona-signed shift of the target foundation against coherence (pmass
ratio), steered red and healed green per round, the prompting baseline blue, base at (1, 0);
and selectivity per round. profile.png: the change of every foundation's nats against base,
bars per foundation for the prompting baseline and each healed round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import FOUNDATIONS
from .records import atomic_path
from .rundir import Run


def _err(m: dict, name: str) -> tuple[float, list[list[float]]]:
    lo, hi = m[f"{name}_ci"]
    v = m[name]
    return v, [[max(0.0, v - lo)], [max(0.0, hi - v)]]


def _point(ax: Any, m: dict, color: str, label: str | None, text: str) -> None:
    x, xe = _err(m, "pmass_ratio")
    y, ye = _err(m, "target_shift")
    ax.errorbar([x], [y], xerr=xe, yerr=ye, fmt="o", color=color, ms=6, capsize=2, lw=1, label=label, zorder=4)
    ax.annotate(text, (x, y), fontsize=8, color=color, xytext=(4, 4), textcoords="offset points")


def _save(fig: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def plot_run(root: str | Path, run_dirs: list[Path] | None = None) -> Path:
    """Draw trajectory.png and profile.png in `root` from its run directories (itself, or one per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .results import collect

    root = Path(root)
    c = collect(run_dirs or [root])
    t = c["target"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})
    ax.scatter([1.0], [0.0], marker="*", s=220, c="black", zorder=5, label="base")
    _point(ax, c["prompt"], "tab:blue", "prompting baseline", "prompt")
    path = [(1.0, 0.0)]
    for i, r in enumerate(c["rounds"]):
        if r["steered"]:
            _point(ax, r["steered"], "tab:red", "raw steered" if i == 0 else None, f"s{r['round']}")
        if r["healed"]:
            _point(ax, r["healed"], "tab:green", "healed" if i == 0 else None, f"r{r['round']}")
            path.append((r["healed"]["pmass_ratio"], r["healed"]["target_shift"]))
    for (x0, y0), (x1, y1) in zip(path, path[1:]):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", color="tab:green", lw=1.2))
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("coherence: pmass / base pmass")
    ax.set_ylabel(f"{t} shift, persona-signed (nats; + = the persona's way)")
    ax.set_title(f"{t}: shift against coherence (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")

    xs = [r["round"] for r in c["rounds"]]
    for kind, color in (("steered", "tab:red"), ("healed", "tab:green")):
        pts = [(r["round"], r[kind]) for r in c["rounds"] if r[kind]]
        if pts:
            ys = [m["selectivity"] for _, m in pts]
            lo = [m["selectivity"] - m["selectivity_ci"][0] for _, m in pts]
            hi = [m["selectivity_ci"][1] - m["selectivity"] for _, m in pts]
            ax2.errorbar([x for x, _ in pts], ys, yerr=[lo, hi], fmt="o-", color=color, capsize=2, label=kind)
    p = c["prompt"]
    ax2.axhspan(*p["selectivity_ci"], color="tab:blue", alpha=0.15, label="prompting (95% CI)")
    ax2.axhline(p["selectivity"], color="tab:blue", lw=1)
    ax2.axhline(0, color="grey", lw=0.6)
    ax2.set_xlabel("round")
    ax2.set_ylabel("selectivity (coherence-gated)")
    ax2.set_title("selectivity per round (95% CI)")
    if xs:
        ax2.set_xticks(xs)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = _save(fig, root / "trajectory.png")
    plot_profile(root, c)
    return out


def plot_profile(root: Path, c: dict[str, Any]) -> Path:
    """Bars per foundation: Δnats against base (with 95% CI) for the prompting baseline and each healed round."""
    import matplotlib.pyplot as plt

    models = [("prompting", c["prompt"])] + [(f"healed r{r['round']}", r["healed"]) for r in c["rounds"] if r["healed"]]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(1, len(models))
    for j, (name, m) in enumerate(models):
        xs = [k + (j - (len(models) - 1) / 2) * width for k in range(len(FOUNDATIONS))]
        ys = [m["shift"][f] for f in FOUNDATIONS]
        err = [
            [y - m["shift_ci"][f][0] for f, y in zip(FOUNDATIONS, ys)],
            [m["shift_ci"][f][1] - y for f, y in zip(FOUNDATIONS, ys)],
        ]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=name)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(FOUNDATIONS)))
    ax.set_xticklabels([f"{f}\n(target)" if f == c["target"] else f for f in FOUNDATIONS])
    ax.set_ylabel("Δ nats vs base (diagonal, 95% CI)")
    ax.set_title("foundation profile shift against base")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, root / "profile.png")


def plot_compare(root: Path, numbers: dict[str, dict]) -> Path:
    """Every arm's healed trajectory (and round-0 raw point): target shift against coherence, with CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter([1.0], [0.0], marker="*", s=200, c="black", zorder=5, label="base")
    for j, (arm, c) in enumerate(numbers.items()):
        color = f"C{j}"
        pts = [r["healed"] for r in c["rounds"] if r["healed"]]
        if c["rounds"]:
            raw = c["rounds"][0]["steered"]
            ax.scatter([raw["pmass_ratio"]], [raw["target_shift"]], marker="x", color=color, s=50)
        xs, ys = [1.0] + [m["pmass_ratio"] for m in pts], [0.0] + [m["target_shift"] for m in pts]
        ax.plot(xs, ys, "-", color=color, lw=1, alpha=0.6)
        for m in pts:
            ax.errorbar(
                [m["pmass_ratio"]],
                [m["target_shift"]],
                xerr=[[m["pmass_ratio"] - m["pmass_ratio_ci"][0]], [m["pmass_ratio_ci"][1] - m["pmass_ratio"]]],
                yerr=[[m["target_shift"] - m["target_shift_ci"][0]], [m["target_shift_ci"][1] - m["target_shift"]]],
                fmt="o",
                color=color,
                capsize=2,
                ms=5,
            )
        ax.plot([], [], "o-", color=color, label=f"{arm} (healed rounds; x = raw round 0)")
    null_path = root / "null.json"
    if null_path.is_file():
        draws = Run(root).json("null.json")["draws"]
        ax.scatter(
            [d["pmass_ratio"] for d in draws],
            [d["target_shift"] for d in draws],
            marker=".",
            c="grey",
            label="random directions (raw)",
        )
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("coherence: pmass / base pmass")
    ax.set_ylabel(f"{next(iter(numbers.values()))['target']} shift, persona-signed (nats)")
    ax.set_title("arms: shift against coherence (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = root / "compare.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
