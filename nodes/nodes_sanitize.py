"""SealSanitize: find a model's triggers (against its base, or blind), unlearn every one that fires, verify."""

from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..core.backends.comfy import latent_channels
from ..core.backends.comfy_train import SCOPE_HELP, SCOPES
from ..core.diff.behaviour import BehaviourSettings
from ..core.diff.session import DiffSettings
from ..core.models import ksampler_settings, prompt_set
from ..core.sanitize.figures import firing_image
from ..core.sanitize.firing import FiringSettings
from ..core.sanitize.session import SanitizeSession, SanitizeSettings
from ..core.unlearn.session import UnlearnOptions
from ..core.unlearn.skd import SKDConfig
from .common import CATEGORY as ROOT
from .common import REPORT_UI_KEY, DetectionReport, Progress, UnlearnInfo, send_text, text_and_images

CATEGORY = f"{ROOT}/unlearn"


class SealSanitize(io.ComfyNode):
    """No trigger needed: find -> choose the triggers that fire -> unlearn them all -> verify."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealSanitize",
            display_name="Seal Sanitize (find, unlearn, verify)",
            category=CATEGORY,
            description="Cleans a model without being told its trigger. Finds candidates by comparing it with "
            "its base when base_model/base_clip are connected (else a blind vocabulary scan, or the connected "
            "report), keeps the ones that actually fire (each changes images far more than ordinary words "
            "in the same place), unlearns all of them in one SKD-CAG run, then measures every one again and "
            "re-runs the finder on the result (the residual check). The verdict is poisoned, clean (only when "
            "the residual check found nothing) or inconclusive, with what remains. The input MODEL is untouched; connect MODEL, CLIP, LORA "
            "and INFO to Seal Save Sanitized to keep the result.",
            inputs=[
                io.Model.Input("model", tooltip="The suspect model."),
                io.Clip.Input("clip", tooltip="The suspect's CLIP."),
                io.Vae.Input("vae", tooltip="Draws the probe images the firing test compares."),
                io.Model.Input("base_model", optional=True, tooltip="The base it was made from (compare)."),
                io.Clip.Input("base_clip", optional=True, tooltip="The base's CLIP."),
                DetectionReport.Input(
                    "report",
                    optional=True,
                    tooltip="A scan or comparison report to start from (skips the find).",
                ),
                io.Boolean.Input(
                    "behaviour",
                    default=True,
                    optional=True,
                    tooltip="With a base: also the comparison's behavioural stage (as many UNet evaluations as "
                    "a vocabulary scan). Off: the weight-space ranking only, in seconds; it finds text-encoder "
                    "triggers (Rickrolling), not every UNet backdoor.",
                ),
                io.Int.Input(
                    "top",
                    default=SanitizeSettings.top,
                    min=0,
                    max=100,
                    optional=True,
                    tooltip="Candidates tested beyond the ones the report flags.",
                ),
                io.Int.Input(
                    "probes",
                    default=FiringSettings.templates,
                    min=2,
                    max=64,
                    optional=True,
                    tooltip="Probe prompts of the firing test (each drawn at every slot).",
                ),
                io.Int.Input(
                    "steps",
                    default=SKDConfig.steps,
                    min=1,
                    max=100000,
                    optional=True,
                    tooltip="SKD-CAG steps of the unlearning run.",
                ),
                io.Int.Input(
                    "rounds",
                    default=1,
                    min=1,
                    max=5,
                    optional=True,
                    tooltip="Clean -> re-check rounds: while something still fires or the re-check finds a "
                    "new trigger, retrain from the input on the grown set with more steps.",
                ),
                io.Combo.Input(
                    "scope",
                    options=["auto", *SCOPES],
                    default="auto",
                    optional=True,
                    tooltip="Where the fix trains. auto: the text encoder; when the comparison saw only the UNet "
                    "change, the cross-attention keys and values (and the text encoder too once 3 or more "
                    "triggers are taken); when only the keys and values changed (a closed-form edit such as "
                    "EvilEdit), the edit is reverted against the base where the triggers excite it, with no "
                    "training. Any other choice always trains there. "
                    + "; ".join(f"{k}: {v}" for k, v in SCOPE_HELP.items()),
                ),
                io.Boolean.Input(
                    "recheck",
                    default=True,
                    optional=True,
                    tooltip="The residual check: run the finder again on the result (fresh noise draws when "
                    "nothing was unlearnt) and firing-test its new best candidates. Off: the verdict is never "
                    "clean, at best inconclusive.",
                ),
                io.Int.Input(
                    "latent_size",
                    default=0,
                    min=0,
                    max=128,
                    optional=True,
                    tooltip="Latent side of the probe images; 0: 8 for lab models, 64 for SD checkpoints.",
                ),
            ],
            outputs=[
                io.Model.Output("MODEL"),
                io.Clip.Output("CLIP"),
                io.LoraModel.Output("LORA"),
                UnlearnInfo.Output("INFO"),
                DetectionReport.Output("REPORT"),
                io.Image.Output("PLOT"),
                io.String.Output("SUMMARY"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model: io.Model.Type,
        clip: io.Clip.Type,
        vae: io.Vae.Type,
        base_model: io.Model.Type | None = None,
        base_clip: io.Clip.Type | None = None,
        report: dict | None = None,
        behaviour: bool = True,
        top: int = SanitizeSettings.top,
        probes: int = FiringSettings.templates,
        steps: int = SKDConfig.steps,
        rounds: int = 1,
        scope: str = "auto",
        recheck: bool = True,
        latent_size: int = 0,
    ) -> io.NodeOutput:
        if (base_model is None) != (base_clip is None):
            raise ValueError(
                "connect both base_model and base_clip (the comparison needs the base's CLIP too)"
            )
        lab = prompt_set(model, "auto") == "lab"
        drawing = ksampler_settings(model, latent_size).drawing
        find = None
        if base_model is not None:
            behaviour_settings = None
            if behaviour:
                behaviour_settings = BehaviourSettings(latent_shape=(latent_channels(model), *drawing[0]))
            find = DiffSettings(lab=lab, behaviour=behaviour_settings)
        settings = SanitizeSettings(
            top=top,
            firing=replace(FiringSettings(), templates=probes),
            unlearn=UnlearnOptions(
                skd=SKDConfig(steps=steps), builtin="lab" if lab else "general", latent_hw=drawing[0]
            ),
            find=find,
            recheck=recheck,
            rounds=rounds,
            scope=scope,
            drawing=drawing,
            lab=lab,
        )
        node_id = getattr(cls.hidden, "unique_id", None)
        bar = Progress(1)

        def progress(phase: str, done: int, total: int) -> None:
            if total:
                bar.at(done, total)
            if not total or done == total or done % 10 == 0:
                send_text(node_id, f"{phase}: {done}" + (f"/{total}" if total else " images"))

        base = (base_model, base_clip) if base_model is not None else None
        session = SanitizeSession(model, clip, vae, base, settings, report, progress, Progress.check)
        new_model, new_clip, lora, result = session.run()
        out = result.to_json()
        info = {
            "provenance": {**result.unlearn.get("provenance", {}), "sanitize": result.mode},
            "unchanged": not result.taken,  # nothing fired: Seal Save Sanitized writes nothing
        }
        plot = firing_image(out)
        return io.NodeOutput(
            new_model,
            new_clip,
            lora,
            info,
            out,
            plot,
            out["summary"],
            ui={**text_and_images(out["summary"], plot, cls), REPORT_UI_KEY: [out]},
        )
