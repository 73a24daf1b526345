"""Figures as ComfyUI IMAGE tensors (matplotlib, off-screen)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def new_figure(width: float, height: float):
    """A matplotlib Figure drawn off-screen (no pyplot: nothing global changes in the host process)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def figure_to_image(fig) -> torch.Tensor:
    """A matplotlib figure as a 1 x H x W x 3 float IMAGE in [0, 1]."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    arr = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def loss_curve_image(losses: list[dict], title: str = "") -> torch.Tensor:
    """Each loss term per training step (log scale; context matching's "match" first, then SKD's), as an IMAGE."""
    fig = new_figure(6, 3.2)
    ax = fig.add_subplot()
    for key in ("match", "loss", "pred", "attn"):
        points = [(i + 1, r[key]) for i, r in enumerate(losses) if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), label=key, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return figure_to_image(fig)
