"""One detection job on ComfyUI MODEL/CLIP objects, shared by the nodes and the `detect` / `scan` commands.

`PromptDetection` checks prompts: a probe over the model, thresholds calibrated on clean prompts of the
same model, and the transplant detector's clean probe prompts. `scan_model` ranks the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..backends.comfy_probe import ComfyProbe
from ..prompts import builtin_prompts, prompt_lines
from .masking import MaskingSettings
from .prompts import (
    Calibration,
    PromptReport,
    calibrate_on,
    detect_prompt,
    prompt_set_report,
    transplant_scanner,
)
from .scan import ScanReport, ScanSettings, VocabularyScanner

CALIBRATION_SEED = 1  # calibration prompts come from another draw than the transplant probes (seed 0)
CALIBRATION_FORMAT = 1  # part of a cached calibration's key: raise it when a detector's scores change


@dataclass(frozen=True)
class DetectOptions:
    """Which built-in prompts calibrate and probe, how many, and the probed latent's side."""

    lab: bool = False  # the lab grammar (lab models) or everyday captions
    calibration_prompts: int = 24  # built-in clean prompts added to the user's for calibration
    probe_prompts: int = 32  # clean probes each token is transplanted into
    latent_side: int = 64

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The probed latent (C x H x W)."""
        return (4, self.latent_side, self.latent_side)


class PromptDetection:
    """Is a prompt triggered, and by which token? Calibrate once per model, then check prompts."""

    def __init__(self, model, clip, opts: DetectOptions | None = None) -> None:
        self.opts = opts or DetectOptions()
        self.probe = ComfyProbe(model, clip)
        self.settings = MaskingSettings(latent_shape=self.opts.latent_shape)
        probes = builtin_prompts(self.opts.lab, self.opts.probe_prompts, seed=0)
        self.transplant = transplant_scanner(self.probe, probes, self.settings.latent_shape)
        self.calibration: Calibration | None = None
        self.calibration_cached = False

    def calibration_set(self, clean_prompts: str | Sequence[str] = (), builtin: bool = True) -> list[str]:
        """The user's clean prompts, followed by the built-in ones unless `builtin` is off."""
        return self.builtin_calibration(self.opts, clean_prompts, builtin)

    @staticmethod
    def builtin_calibration(
        opts: DetectOptions, clean_prompts: str | Sequence[str] = (), builtin: bool = True
    ) -> list[str]:
        """The user's clean prompts, followed by the built-in ones unless `builtin` is off."""
        own = prompt_lines(clean_prompts)
        if not builtin:
            return own
        return own + builtin_prompts(opts.lab, opts.calibration_prompts, CALIBRATION_SEED)

    def calibrate(
        self,
        prompts: Sequence[str],
        name: str = "MODEL",
        tick: Callable[[], None] | None = None,
        cache: bool = True,
    ) -> Calibration:
        """Thresholds from clean prompts of this model (tick after each; it may raise to stop).

        With `cache`, a calibration of the same weights, prompts and settings made before is read from the
        cache folder (`core.cache`) instead of scoring every prompt again (about 100 UNet evaluations each);
        `self.calibration_cached` says which happened."""
        from dataclasses import asdict

        from ..backends.comfy import weights_fingerprint
        from ..cache import cached

        def compute() -> dict:
            return asdict(calibrate_on(self.probe, prompts, self.settings, self.transplant, name, tick))

        if not cache:
            value, hit = compute(), False
        else:
            key = {
                "format": CALIBRATION_FORMAT,
                "weights": weights_fingerprint(self.probe.model, self.probe.clip),
                "prompts": list(prompts),
                "masking": asdict(self.settings),
                "transplant_probes": list(self.transplant.prompts),
                "transplant": asdict(self.transplant.settings),
            }
            value, hit = cached("calibration", key, compute)
            if hit and tick:
                for _ in prompts:
                    tick()
        self.calibration = Calibration(**{**value, "model": name})
        self.calibration_cached = hit
        return self.calibration

    def check(self, prompt: str) -> PromptReport:
        """Score one prompt against the calibration and name its most likely trigger token."""
        if self.calibration is None:
            raise ValueError("calibrate first (or load a calibration)")
        return detect_prompt(self.probe, prompt, self.calibration, self.settings, transplant=self.transplant)

    def run(self, prompts: Sequence[str], tick: Callable[[], None] | None = None) -> dict:
        """Check every prompt; the report of the set (what Seal Detect Prompt passes on)."""
        if not prompts:
            raise ValueError("no prompt to check: write one prompt per line in 'prompts'")
        reports = []
        for p in prompts:
            reports.append(self.check(p).to_dict())
            if tick:
                tick()
        report = prompt_set_report(reports, self.calibration)
        report["calibration_cached"] = self.calibration_cached
        return report


def scan_model(
    model,
    clip,
    settings: ScanSettings,
    clean_prompts: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> ScanReport:
    """The blind vocabulary scan of a MODEL/CLIP on these clean probe prompts."""
    return VocabularyScanner(
        ComfyProbe(model, clip), clean_prompts, settings, progress, check_interrupt
    ).run()


def scan_prompts(
    lab: bool, settings: ScanSettings, own: str | Sequence[str] = (), builtin: bool = True
) -> list[str]:
    """The scan's clean probe prompts: the user's, then (unless `builtin` is off) enough built-in ones."""
    prompts = prompt_lines(own)
    if builtin:
        prompts += builtin_prompts(lab, max(32, settings.stage2_probes))
    return prompts
