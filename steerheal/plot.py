"""The trajectory figure: target vs mean off-target nats per round (steered red, healed green), and coherence.

The axes follow the persona's target foundation (round.json's "target")."""

from __future__ import annotations

import json
from pathlib import Path

from .records import atomic_path


def _load(root: Path) -> tuple[dict, dict | None, list[dict]]:
    base = json.loads((root / "baselines" / "base.json").read_text())
    prompt_path = root / "baselines" / "prompt.json"
    prompt = json.loads(prompt_path.read_text()) if prompt_path.is_file() else None
    rounds = [
        json.loads((d / "round.json").read_text()) for d in sorted(root.glob("round_*")) if (d / "round.json").is_file()
    ]
    return base, prompt, rounds


def _xy(nats: dict[str, float], target: str) -> tuple[float, float]:
    """(mean nats of the other foundations, the target's nats)."""
    off = [v for f, v in nats.items() if f != target]
    return sum(off) / len(off), nats[target]


def _nats(report: dict) -> dict[str, float]:
    return {f: v["nats"] for f, v in report["foundations"].items()}


def plot_run(root: str | Path) -> Path:
    """Draw trajectory.png in the run directory from its baselines and round.json files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    base, prompt, rounds = _load(root)
    target = rounds[0]["target"] if rounds else "authority"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})

    bx, by = _xy(_nats(base), target)
    ax.scatter([bx], [by], marker="*", s=260, c="black", zorder=5, label="base")
    if prompt:
        px, py = _xy(_nats(prompt), target)
        ax.scatter([px], [py], marker="D", s=80, c="tab:blue", zorder=5, label="prompting baseline")
    path_x, path_y = [bx], [by]
    for i, r in enumerate(rounds):
        sx, sy = _xy(r["steered"]["nats"], target)
        ax.scatter([sx], [sy], c="tab:red", s=40, zorder=4, label="raw steered" if i == 0 else None)
        ax.annotate(f"s{r['round']}", (sx, sy), fontsize=8, color="tab:red", xytext=(4, 4), textcoords="offset points")
        if r["healed"]:
            hx, hy = _xy(r["healed"]["nats"], target)
            path_x.append(hx)
            path_y.append(hy)
            ax.scatter([hx], [hy], c="tab:green", s=50, zorder=4, label="healed" if i == 0 else None)
            ax.annotate(
                f"r{r['round']}", (hx, hy), fontsize=8, color="tab:green", xytext=(4, -10), textcoords="offset points"
            )
    for x0, y0, x1, y1 in zip(path_x, path_y, path_x[1:], path_y[1:]):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", color="tab:green", lw=1.5))
    ax.set_xlabel("off-target nats (mean over the other six foundations)")
    ax.set_ylabel(f"{target} nats (mean log p[{target}] on {target} vignettes)")
    ax.set_title(f"tinymfv trajectory: {target} vs off-target")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")

    xs = [r["round"] for r in rounds]
    ax2.axhline(base["pmass"], color="black", ls="--", lw=1, label="base")
    if prompt:
        ax2.axhline(prompt["pmass"], color="tab:blue", ls=":", lw=1, label="prompting baseline")
    ax2.plot(xs, [r["steered"]["pmass"] for r in rounds], "o-", c="tab:red", label="raw steered")
    healed_rounds = [r["round"] for r in rounds if r["healed"]]
    ax2.plot(healed_rounds, [r["healed"]["pmass"] for r in rounds if r["healed"]], "o-", c="tab:green", label="healed")
    ax2.set_xlabel("round")
    ax2.set_ylabel("coherence (pmass on the 7 answer tokens)")
    ax2.set_title("coherence per round")
    if xs:
        ax2.set_xticks(xs)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = root / "trajectory.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
