"""Throughput vs p99 latency, one line per method (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path


def throughput_vs_p99(series: dict[str, list[dict]], path: Path, title: str) -> Path | None:
    """``series``: method -> points with ``candidates_per_s`` and ``p99_ms`` (and a label key, optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(10, 6))
    colours = plt.get_cmap("tab20").colors
    for i, (name, points) in enumerate(series.items()):
        pts = sorted((p for p in points if p.get("p99_ms")), key=lambda p: p["candidates_per_s"])
        if not pts:
            continue
        # 20 colours x 3 line styles: no two series look alike
        ax.plot([p["candidates_per_s"] for p in pts], [p["p99_ms"] for p in pts], marker="os^"[i // 20 % 3],
                linestyle=("-", "--", ":")[i // 20 % 3], color=colours[i % 20], label=name)
        for p in pts:
            if "label" in p:
                ax.annotate(str(p["label"]), (p["candidates_per_s"], p["p99_ms"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("candidates scored / s")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
