"""The model card's figures: the loss curve from a training log (`<stem>.log.jsonl`)."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(log_path: Path) -> tuple[list[dict], list[dict]]:
    """(step events, checkpoint/done events) of a training log."""
    steps, evals = [], []
    for line in Path(log_path).read_text().splitlines():
        ev = json.loads(line)
        (steps if ev["kind"] == "step" else evals).append(ev)
    return steps, evals


def plot_loss(log_path: Path, png_path: Path, title: str = "") -> Path:
    """Training loss (EMA) and held-out loss against training tokens, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = read_log(log_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([e["tokens"] / 1e6 for e in steps], [e["loss_ema"] for e in steps], label="training loss (EMA)", lw=1.5)
    held = [e for e in evals if e.get("heldout_loss") is not None]
    if held:
        ax.plot([e["tokens"] / 1e6 for e in held], [e["heldout_loss"] for e in held], "o-", label="held-out loss (plain code)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(log_path).stem)
    ax.grid(alpha=0.3)
    ax.legend()
    if steps:
        ax.set_title((title or Path(log_path).stem) + f" — {steps[-1]['seconds'] / 60:.0f} min of training")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
