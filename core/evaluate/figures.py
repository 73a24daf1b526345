"""The report as pictures: attack success before/after, the fidelity distribution, and an image grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..images import image_to_uint8, save_png
from ..plots import figure_to_image, new_figure
from .report import EvaluationReport

FIGURE_FILES = ("attack_success.png", "fidelity.png", "images.png")  # what save_figures writes
ROWS = (
    ("triggered_before", "triggered\noriginal"),
    ("triggered_after", "triggered\nafter removal"),
    ("clean_before", "clean\noriginal"),
    ("clean_after", "clean\nafter removal"),
)


def _asr_axes(ax, report: EvaluationReport) -> None:
    bars = ax.bar(["before", "after"], [report.asr_before, report.asr_after], color=["#c0392b", "#27ae60"])
    ax.bar_label(bars, labels=[f"{report.asr_before:.0%}", f"{report.asr_after:.0%}"])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("attack success")
    ax.set_title(f"triggered prompts ({report.prompts})", fontsize=9)


def _fidelity_axes(ax, report: EvaluationReport) -> None:
    ax.hist(report.fidelity_ssim, bins=np.linspace(0, 1, 21), color="#2c7fb8")
    ax.axvline(float(np.mean(report.fidelity_ssim)), color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("SSIM, after removal vs original (same seed)")
    ax.set_ylabel("clean prompts")
    ax.set_title(f"clean fidelity: mean SSIM {np.mean(report.fidelity_ssim):.3f}", fontsize=9)


def _grid_axes(fig, spec, report: EvaluationReport, columns: int) -> None:
    n = min(columns, report.prompts)
    for r, (key, label) in enumerate(ROWS):
        fired = report.fired.get(key.split("_")[1]) if key.startswith("triggered") else None
        for c in range(n):
            ax = fig.add_subplot(spec[r, c])
            ax.imshow(report.images[key][c])
            ax.set_xticks([])
            ax.set_yticks([])
            if fired is not None:  # a red frame where the judge saw the attack
                for side in ax.spines.values():
                    side.set_color("#c0392b" if fired[c] else "#27ae60")
                    side.set_linewidth(2.5)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)


def report_image(report: EvaluationReport, columns: int = 6) -> torch.Tensor:
    """One IMAGE: the two charts above the grid of triggered and clean images before and after."""
    n = min(columns, report.prompts)
    fig = new_figure(max(8.0, 1.4 * n), 3.2 + 1.4 * len(ROWS))
    grid = fig.add_gridspec(2, 1, height_ratios=[3.0, 1.4 * len(ROWS)])
    top = grid[0].subgridspec(1, 2, wspace=0.35)
    _asr_axes(fig.add_subplot(top[0]), report)
    _fidelity_axes(fig.add_subplot(top[1]), report)
    _grid_axes(fig, grid[1].subgridspec(len(ROWS), n, wspace=0.05, hspace=0.08), report, n)
    fig.suptitle(report.summary().splitlines()[0], fontsize=9)
    return figure_to_image(fig)


def save_figures(report: EvaluationReport, folder: str | Path, columns: int = 6) -> list[Path]:
    """attack_success.png, fidelity.png and images.png in a folder (new files; existing ones are kept)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    n = min(columns, report.prompts)
    for name, width, height, draw in (
        ("attack_success.png", 4.0, 3.2, lambda fig: _asr_axes(fig.add_subplot(), report)),
        ("fidelity.png", 4.5, 3.2, lambda fig: _fidelity_axes(fig.add_subplot(), report)),
        (
            "images.png",
            max(6.0, 1.4 * n),
            1.4 * len(ROWS) + 0.4,
            lambda fig: _grid_axes(fig, fig.add_gridspec(len(ROWS), n, wspace=0.05, hspace=0.08), report, n),
        ),
    ):
        path = folder / name
        if path.exists():
            raise FileExistsError(f"{path} exists: choose another folder (nothing is overwritten)")
        fig = new_figure(width, height)
        draw(fig)
        written.append(save_png(image_to_uint8(figure_to_image(fig)), path))
    return written
