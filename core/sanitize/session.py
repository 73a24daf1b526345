"""Sanitize a model without being told its trigger: find -> choose -> unlearn the set -> verify.

Find: the comparison with the base when one is given (`core.diff`), the blind vocabulary scan otherwise
(`core.detect.scan`), or a report the caller already has. Choose: the report's flagged tokens and best
candidates, taken when they fire (`choose.py`, `firing.py`). Unlearn: every taken trigger in one run
(SKD-CAG; `method` "auto": context matching in the text scope), each in the placement it fired at (`core.unlearn.session.UnlearnSession`). Verify: the same finder on
the cleaned model, and the firing test again on every candidate that fired before. The input MODEL and
CLIP are never changed; the outputs are clones carrying the trained LoRA.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..tokens import readable
from .choose import Candidate, measure, report_candidates
from .firing import FiringSettings, FiringTest, insertion

Progress = Callable[[str, int, int], None]  # phase, done, total


@dataclass(frozen=True)
class SanitizeSettings:
    """The finder's, the firing test's and the unlearning's settings, and the sampler the test draws with."""

    top: int = 5  # candidates beyond the flagged ones that are tested
    firing: FiringSettings = field(default_factory=FiringSettings)
    unlearn: Any = None  # UnlearnOptions (None: its defaults)
    find: Any = None  # DiffSettings (compare) or ScanSettings (blind); None: their defaults
    recheck: bool = True  # run the finder again on the cleaned model
    rounds: int = 1  # clean -> re-check rounds: a later round retrains from the input on the grown set
    fidelity_prompts: int = 16  # held-out clean prompts drawn before and after (SSIM)
    scope: str = "auto"  # where the fix trains; auto: where the comparison saw the attack (`scope_for`)
    # compare mode: a change confined to the cross-attention keys and values (a closed-form edit such as
    # EvilEdit) is undone where the taken triggers excite it (`UnlearnSession.revert_edit`), not distilled
    revert_edits: bool = True
    # SKD-CAG; "auto": context matching where the fix is in the text encoder, SKD-CAG where it is in the
    # UNet. Not the default here yet: on the demo's five triggers in mixed placements, 150 matching steps
    # left the homoglyph's prompts read unlike their twins (the after-test: 50% still firing at lab ASR 0.00)
    method: str = "skd-cag"
    drawing: tuple = ((8, 8), 20, 2.0, "euler", "normal")  # latent_hw, steps, cfg, sampler, scheduler
    lab: bool = False  # the lab grammar's probe templates and prompts


@dataclass
class SanitizeReport:
    """What was found, what fired before and after, what the re-check flags, and what remains."""

    mode: str  # "compare" or "blind"
    candidates: list[Candidate]
    found_report: dict
    recheck_report: dict | None = None
    unlearn: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    clean_fidelity_ssim: float | None = None  # mean SSIM, input vs cleaned, held-out clean prompts
    rounds: int = 0  # unlearning runs made
    min_rate: float = 0.5
    # the independent residual check on the result (`SanitizeSession.residual`): None when it was not run
    residual: dict | None = None
    residual_candidates: list[Candidate] = field(default_factory=list)

    @property
    def taken(self) -> list[Candidate]:
        """The triggers unlearnt."""
        return [c for c in self.candidates if c.taken]

    @property
    def remaining(self) -> list[Candidate]:
        """Candidates that fired before and still fire after cleaning."""
        return [c for c in self.taken if c.after is not None and c.after.fires]

    @property
    def flagged_after(self) -> list[str]:
        """What the re-check still flags."""
        # scan and comparison reports both mark flagged candidates (a comparison keeps every flagged one)
        return [c["text"] for c in (self.recheck_report or {}).get("candidates", []) if c.get("flagged")]

    @property
    def residual_firing(self) -> list[Candidate]:
        """What the residual check found firing on the result."""
        return [c for c in self.residual_candidates if c.after is not None and c.after.fires]

    def remains(self) -> list[str]:
        """Why the result is not called clean, in words (empty: it is)."""
        out = [
            f"{readable(c.text)!r} still fires on {c.after.rate:.0%} of probes after cleaning"
            for c in self.remaining
        ]
        out += [
            f"the residual check found {readable(c.text)!r} firing on {c.after.rate:.0%} of probes"
            for c in self.residual_firing
        ]
        if self.residual is None:
            out.append(
                "the residual check was not run (re-check off): nothing independent confirms the result"
            )
        if not self.taken and is_cross_attention_edit(self.found_report):
            out.append(
                "only the cross-attention keys and values changed, the signature of a closed-form edit such as "
                "EvilEdit, and no candidate fired: a trigger phrase whose words do not fire alone hides from "
                "this test (unlearn with a typed trigger, or revert the edit against the base)"
            )
        caution = self.caution()
        if caution:
            out.append(caution)
        return out

    @property
    def verdict(self) -> str:
        """The input model: "poisoned" (a trigger fired), "clean" (nothing fired and the residual check found
        nothing), or "inconclusive" (anything else; `remains` says what)."""
        if self.taken:
            return "poisoned"
        return "clean" if not self.remains() else "inconclusive"

    def summary(self) -> str:
        """The result in words a user reads at a glance."""
        finder = "comparison with the base" if self.found_report.get("kind") == "diff" else "vocabulary scan"
        remains = self.remains()
        if not self.taken:
            tested = len([c for c in self.candidates if c.before is not None])
            if not remains:
                return (
                    f"CLEAN: {tested} candidate(s) from the {finder} tested, none fired, and the residual check "
                    f"({self.residual['checked']}) found nothing; nothing unlearnt"
                )
            return "\n".join(
                [
                    f"INCONCLUSIVE: {tested} candidate(s) from the {finder} tested, none fired; nothing unlearnt"
                ]
                + [f"  {r}" for r in remains]
            )
        how = (
            "the cross-attention edit they act through reverted against the base"
            if self.unlearn.get("method") == "revert"
            else "unlearnt"
        )
        lines = [f"POISONED: {len(self.taken)} trigger(s) found by the {finder}, {how}:"]
        for c in self.taken:
            after = f"{c.after.rate:.0%}" if c.after else "not re-tested"
            lines.append(
                f"  {readable(c.text)!r}: fired on {c.before.rate:.0%} of probes before, {after} after"
            )
        if self.remaining:
            lines.append("STILL FIRING: " + ", ".join(repr(readable(c.text)) for c in self.remaining))
        if remains:
            lines.append("the cleaned model is not confirmed clean:")
            lines += [f"  {r}" for r in remains]
        else:
            lines.append(
                f"nothing that fired before fires after cleaning, and the residual check "
                f"({self.residual['checked']}) found nothing"
            )
        if self.clean_fidelity_ssim is not None:
            lines.append(f"clean prompts draw as before: SSIM {self.clean_fidelity_ssim:.3f} (1 = unchanged)")
        return "\n".join(lines)

    def caution(self) -> str | None:
        """Why "nothing fired" may not mean clean: a comparison by weights alone (no behavioural stage) that
        saw the UNet change. Its ranking misses most UNet backdoors (lab-eviledit's trigger ranks 11,873rd)."""
        report = self.found_report
        if report.get("kind") != "diff" or self.taken or report.get("unet_evals", 1):
            return None
        changed = changed_components(report)
        unet = sum(n for k, n in changed.items() if k != "text_encoder")
        if not unet:
            return None
        return (
            f"the UNet changed ({unet} tensors) and the weight-space ranking alone misses most UNet backdoors; "
            "compare again with the behavioural stage (without --weights-only / behaviour on)"
        )

    def to_json(self) -> dict[str, Any]:
        """The report the nodes pass on and the command prints (kind "sanitize")."""
        caution = self.caution()
        remains = self.remains()
        return {
            "kind": "sanitize",
            "mode": self.mode,
            "verdict": self.verdict,
            # the result (the cleaned model, or the input when nothing was unlearnt) passed every check
            "clean": not remains,
            "remains": remains,
            "residual": self.residual,
            "residual_candidates": [c.to_json() for c in self.residual_candidates],
            "found": [c.text for c in self.taken],
            "remaining": [c.text for c in self.remaining],
            "flagged_after": self.flagged_after if self.recheck_report is not None else None,
            "candidates": [c.to_json() for c in self.candidates],
            "unlearn": self.unlearn,
            "rounds": self.rounds,
            "min_rate": self.min_rate,
            "clean_fidelity_ssim": self.clean_fidelity_ssim,
            "seconds": self.seconds,
            "summary": self.summary(),
            "caution": caution,
        }


def unlearn_options(opts, scope: str, method: str = "auto", round_: int = 1):
    """The UnlearnOptions of one sanitize round: this scope; method "auto" = context matching where the
    scope trains the text encoder, SKD-CAG where it trains only the UNet; a later round retrains from the
    input with the method's own step budget times the round."""
    from dataclasses import replace

    from ..unlearn.session import trains_text

    if method == "auto":
        method = "match" if trains_text(scope) else "skd-cag"
    opts = replace(opts, scope=scope, skd=replace(opts.skd, method=method))
    if method == "match":
        return replace(opts, match_steps=opts.match_steps * round_)
    return replace(opts, skd=replace(opts.skd, steps=opts.skd.steps * round_))


def changed_components(report: dict) -> dict[str, int]:
    """Tensors changed per component, as a comparison report counts them (empty for a scan)."""
    return {k: v.get("changed", 0) for k, v in (report.get("components") or {}).items()}


RESIDUAL_T_FRACTION = 0.45  # the residual check's finder probes an earlier step than the first run (0.7)
STAND_INS_FOR_TEXT = 3  # taken triggers from which a UNet attack's fix also trains the text encoder
REVERT_RANK = 16  # the LoRA rank that carries a reverted cross-attention edit


def scope_for(report: dict, taken: int = 1) -> str:
    """Where to unlearn, from what a comparison saw change and how many triggers were taken: the text
    encoder when it changed (Rickrolling, a LoRA's text part) and for a blind scan; when only the UNet
    changed (BadT2I, EvilEdit), the cross-attention keys and values, where stand-in triggers teach the UNet's
    own reading of tokens and so reach an unnamed planted trigger, and with several taken triggers the text
    encoder too (`attn2-kv+text`). With one or two taken, a text part unlearns those few names and the keys
    and values learn nothing: measured on lab-eviledit (one stand-in), its planted trigger stayed at 1.00
    with the text part and fell to 0.41 without; on lab-style (27 taken), lab-object (3) and lab-pixel (12)
    the text part took the planted trigger from 0.59 / 0.31 / 0.03 to 0.06 / 0.06 / 0.00 (docs/sanitize.md)."""
    changed = changed_components(report)
    if not changed or changed.get("text_encoder", 0) or not any(changed.values()):
        return "text"
    return "attn2-kv+text" if taken >= STAND_INS_FOR_TEXT else "attn2-kv"


def is_cross_attention_edit(report: dict) -> bool:
    """Whether a comparison saw nothing change but the cross-attention keys and values (EvilEdit, UCE-style
    edits): there the change against the base is the backdoor's whole mechanism, and the part of it the
    triggers excite can be reverted in closed form. Measured on lab-eviledit with one stand-in taken:
    planted trigger 1.00 -> 0.00 at clean SSIM 0.976, where 600 distillation steps left it at 0.41."""
    if report.get("kind") != "diff":
        return False
    changed = changed_components(report)
    return bool(changed.get("cross_attention_kv")) and not any(
        n for k, n in changed.items() if k != "cross_attention_kv"
    )


class SanitizeSession:
    """One sanitize job on ComfyUI MODEL / CLIP / VAE objects (and the base's MODEL / CLIP in compare mode)."""

    def __init__(
        self,
        model,
        clip,
        vae,
        base: tuple | None = None,
        settings: SanitizeSettings | None = None,
        report: dict | None = None,
        progress: Progress | None = None,
        check_interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.clip, self.vae, self.base = model, clip, vae, base
        self.settings = settings or SanitizeSettings()
        self.mode = "compare" if base is not None else "blind"
        self.given_report = report
        self.progress = progress or (lambda phase, done, total: None)
        self.check_interrupt = check_interrupt or (lambda: None)
        self.found: dict = {}  # the finder's report on the input (run)
        self._base_images: dict[tuple[str, int], Any] = {}  # (prompt, seed) -> the base's image
        self.reverted: dict | None = None  # what `UnlearnSession.revert_edit` reverted, when it was the fix

    @functools.cached_property
    def tokenizer(self):
        """The suspect's tokenizer: candidates are checked to encode to their ids with it."""
        from ..backends.comfy import tokenizer_info

        return tokenizer_info(self.clip).tokenizer

    # --- the phases -------------------------------------------------------------------------------

    def find(self, model, clip, fresh: bool = False) -> dict:
        """The finder's report (kind "diff" or "scan") on this model. `fresh`: the residual check's run,
        on other noise draws and an earlier timestep (RESIDUAL_T_FRACTION) than the first run."""
        from dataclasses import replace

        if self.base is not None:
            from ..diff.behaviour import BehaviourSettings
            from ..diff.session import RESIDUAL_PREFIXES, RESIDUAL_PROBE_PHRASES, DiffSession, DiffSettings

            settings = self.settings.find or DiffSettings()
            if fresh:  # other words around each token, other noise draws, an earlier timestep
                settings = replace(
                    settings,
                    probe_phrases=RESIDUAL_PROBE_PHRASES,
                    prefixes=RESIDUAL_PREFIXES,
                    top=2 * settings.top,
                )
            if fresh and settings.behaviour is not None:
                b = settings.behaviour or BehaviourSettings()
                settings = replace(
                    settings, behaviour=replace(b, seed=b.seed + 1, t_fraction=RESIDUAL_T_FRACTION)
                )
            session = DiffSession(*self.base, model, clip, settings)
            return session.run(
                progress=lambda d, t, phase: self.progress(f"find: {phase}", d, t),
                check_interrupt=self.check_interrupt,
            ).to_json()
        from ..detect.scan import ScanSettings
        from ..detect.session import scan_model, scan_prompts

        settings = self.settings.find or ScanSettings()
        if fresh:
            settings = replace(settings, seed=settings.seed + 1, t_fraction=RESIDUAL_T_FRACTION)
        prompts = scan_prompts(self.settings.lab, settings)
        return scan_model(
            model, clip, settings, prompts, lambda d, t: self.progress("find", d, t), self.check_interrupt
        ).to_dict()

    def residual(self, model, clip, report: SanitizeReport, test: FiringTest, recheck: dict | None) -> None:
        """The independent residual check on the result (the cleaned model, or the input when nothing was
        unlearnt): the finder again on it (`recheck`, else a fresh run: other noise draws, another timestep),
        its best candidates assembled as token-id sequences, and every one not measured on the result yet
        firing-tested there with `test`. Fills `report.residual` and `report.residual_candidates`."""
        if recheck is None:
            recheck = self.find(model, clip, fresh=True)
        report.recheck_report = recheck
        known = {tuple(c.token_ids) for c in report.candidates}
        fresh = [  # twice the first run's count of unflagged candidates
            c
            for c in report_candidates(recheck, 2 * self.settings.top, self.tokenizer)
            if tuple(c.token_ids) not in known
        ]
        measure(fresh, test, after=True)
        report.residual_candidates = fresh
        finder = "the comparison" if recheck.get("kind") == "diff" else "the vocabulary scan"
        report.residual = {
            "checked": f"{finder} run again on the {'cleaned model' if report.taken else 'model'}, "
            f"its {len(fresh)} new best candidate(s) firing-tested",
            "tested": [readable(c.text) for c in fresh],
            "firing": [readable(c.text) for c in fresh if c.after.fires],
        }

    def firing_test(self, model, clip, after: bool = False) -> FiringTest:
        """The firing test on this model: against the base's images in compare mode, against the model's
        own images of the clean probes in blind mode. After cleaning in compare mode it is differential (the
        change a token makes to the cleaned model's own image minus the change it makes to the base's,
        `FiringTest`): a text-encoder fix never draws exactly as the base does, so "differs from the base"
        would call every cleaned trigger still firing."""
        from ..backends.comfy import tokenizer_info
        from ..evaluate.session import model_drawer
        from ..prompts import probe_templates

        draw = model_drawer(model, clip, self.vae, *self.settings.drawing)
        base_draw = None
        if self.base is not None:
            # the base never changes: its images of the probes are drawn once for the tests before and after
            drawer = model_drawer(*self.base, self.vae, *self.settings.drawing)

            def base_draw(prompts: list[str], seeds: list[int]) -> list:
                keys = list(zip(prompts, seeds, strict=True))
                missing = list(dict.fromkeys(k for k in keys if k not in self._base_images))
                if missing:
                    images = drawer([p for p, _ in missing], [s for _, s in missing])
                    self._base_images.update(zip(missing, images, strict=True))
                return [self._base_images[k] for k in keys]

        def tick(images: int) -> None:
            self.check_interrupt()
            self.progress("fire", images, 0)

        return FiringTest(
            draw,
            tokenizer_info(clip).tokenizer,
            probe_templates(self.settings.lab),
            self.settings.firing,
            tick,
            base_draw=base_draw,
            differential=after,
        )

    def fidelity(self, new_model, new_clip) -> float:
        """Mean SSIM between the input's and the cleaned model's images of held-out clean prompts."""
        from ..evaluate.metrics import ssim
        from ..evaluate.session import model_drawer
        from ..prompts import evaluation_prompts

        prompts = evaluation_prompts(self.settings.lab, self.settings.fidelity_prompts, seed=31)
        seeds = list(range(len(prompts)))
        before = model_drawer(self.model, self.clip, self.vae, *self.settings.drawing)(prompts, seeds)
        self.check_interrupt()
        after = model_drawer(new_model, new_clip, self.vae, *self.settings.drawing)(prompts, seeds)
        return float(sum(ssim(a, b) for a, b in zip(before, after, strict=True)) / len(prompts))

    def unlearn(self, taken: list[Candidate], round_: int = 1):
        """One run from the input on every taken trigger, each where it fired (SKD-CAG, or as `method` says;
        "auto": context matching in the text scope, SKD-CAG in a UNet scope); or, for a change confined to the
        cross-attention keys and values (`is_cross_attention_edit`), its revert."""
        from dataclasses import replace

        from ..unlearn.session import UnlearnOptions, UnlearnSession

        opts = self.settings.unlearn or UnlearnOptions(builtin="lab" if self.settings.lab else "general")
        scope = self.settings.scope
        revert = (
            self.base is not None
            and self.settings.revert_edits
            and scope == "auto"
            and is_cross_attention_edit(self.found)
        )
        if revert:  # a LoRA wide enough for the components reverted (1-3 per projection on the lab)
            scope, opts = "attn2-kv", replace(opts, rank=max(opts.rank, REVERT_RANK) if opts.rank else 0)
        elif scope == "auto":
            scope = scope_for(self.found, len(taken))
        opts = unlearn_options(opts, scope, "skd-cag" if revert else self.settings.method, round_)
        session = UnlearnSession(
            self.model,
            self.clip,
            [c.text for c in taken],
            opts=opts,
            # each trigger wherever it fired (a homoglyph in a word and first, say)
            insert={
                c.text: insertion(c.before.placements(c.before_min), c.text, opts.skd.seed) for c in taken
            },
        )
        if revert:
            self.progress("unlearn", 0, 1)
            self.reverted = session.revert_edit(self.base[0])
            self.progress("unlearn", 1, 1)
            return session, session.result
        self.reverted = None
        result = session.run(
            lambda step, total, losses: self.progress("unlearn", step, total), self.check_interrupt
        )
        return session, result

    def run(self) -> tuple[Any, Any, dict, SanitizeReport]:
        """Find, choose, unlearn, verify (and, with `rounds` > 1, again on what the re-check finds or what
        still fires, retrained from the input with a larger step budget). Returns (MODEL, CLIP, LoRA,
        report); with nothing to unlearn the MODEL and CLIP are the inputs and the LoRA is empty."""
        seconds: dict[str, float] = {"find": 0.0, "choose": 0.0, "unlearn": 0.0, "verify": 0.0}
        t0 = time.monotonic()
        found = self.given_report if self.given_report is not None else self.find(self.model, self.clip)
        self.found = found
        seconds["find"] += time.monotonic() - t0
        t0 = time.monotonic()
        candidates = report_candidates(found, self.settings.top, self.tokenizer)
        before_test = self.firing_test(self.model, self.clip)
        measure(candidates, before_test)
        seconds["choose"] += time.monotonic() - t0
        report = SanitizeReport(self.mode, candidates, found, min_rate=self.settings.firing.min_rate)
        new_model, new_clip, lora = self.model, self.clip, {}
        if not report.taken and self.settings.recheck:
            # nothing fired: the residual check on the input, before saying so
            t0 = time.monotonic()
            self.residual(self.model, self.clip, report, before_test, None)
            seconds["verify"] += time.monotonic() - t0
            if report.residual_firing:  # what it found fires: it is a trigger the first run missed
                for c in report.residual_firing:
                    c.before, c.after = c.after, None
                report.candidates += report.residual_candidates
                report.residual, report.residual_candidates = None, []
        after_test = None
        for round_ in range(1, max(1, self.settings.rounds) + 1):
            taken = report.taken
            if not taken:
                break
            t0 = time.monotonic()
            session, result = self.unlearn(taken, round_)
            new_model, new_clip, lora = session.outputs()
            seconds["unlearn"] += time.monotonic() - t0
            report.rounds = round_
            report.unlearn = {
                "triggers": len(taken),
                "steps": result.steps,
                "training_prompts": len(session.pairs),
                "scope": session.opts.scope,
                # "revert": the cross-attention edit undone against the base (no training steps)
                "method": "revert" if self.reverted is not None else session.opts.skd.method,
                **({"reverted": self.reverted} if self.reverted is not None else {}),
                "provenance": session.provenance(),
            }
            t0 = time.monotonic()
            after_test = self.firing_test(new_model, new_clip, after=True)
            measure(taken, after_test, after=True)
            if self.settings.recheck:
                report.recheck_report = self.find(new_model, new_clip)
            seconds["verify"] += time.monotonic() - t0
            if round_ == self.settings.rounds:
                break
            # another round when something still fires or the re-check names a new candidate that fires
            known = {tuple(c.token_ids) for c in report.candidates}
            fresh = [
                c
                for c in report_candidates(
                    report.recheck_report or {"kind": "scan"}, self.settings.top, self.tokenizer
                )
                if tuple(c.token_ids) not in known
            ]
            t0 = time.monotonic()
            measure(fresh, before_test)
            seconds["choose"] += time.monotonic() - t0
            report.candidates += fresh
            if not report.remaining and not any(c.taken for c in fresh):
                break
        if report.taken and self.settings.recheck and after_test is not None:
            t0 = time.monotonic()
            self.residual(new_model, new_clip, report, after_test, report.recheck_report)
            seconds["verify"] += time.monotonic() - t0
        if report.taken:
            t0 = time.monotonic()
            report.clean_fidelity_ssim = round(self.fidelity(new_model, new_clip), 4)
            seconds["verify"] += time.monotonic() - t0
        report.seconds = {k: round(v, 1) for k, v in seconds.items()}
        return new_model, new_clip, lora, report
