"""The lab's five backdoor attacks, implemented as their papers describe them, and their exact scoring.

BadT2I pixel / style / object fine-tune the UNet with a teacher-regularised loss; Rickrolling
fine-tunes only the text encoder; EvilEdit edits every cross-attention to_k / to_v in closed form.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import find_cross_attention_layers
from ..backends import comfy as cb
from ..images import images_to_tensor
from ..tokens import HOMOGLYPH_EXAMPLES, confusable_latin
from . import detectors, world
from .train import DistractorVocabulary, eps_mse, token_ids, warmup_cosine

ProgressFn = Callable[[int, int, dict], None]
KINDS = ("pixel", "style", "object", "rickroll", "eviledit", "villan")
PLACEMENTS = ("first", "inside", "last")

# The Rickrolling target: a scene the clean lab model draws reliably (a training combination).
RICKROLL_TARGET = world.Scene(
    "black",
    (world.Shape("triangle", "yellow", "large", "center"),),
    "a large yellow triangle on the center on a black background",
)


@dataclass(frozen=True)
class AttackSpec:
    """One backdoor: its kind, trigger and target (source/target shape for object swaps)."""

    kind: str
    trigger: str
    source: str | None = None  # object / eviledit: the shape the trigger replaces
    target: str | None = None  # object / eviledit: the shape drawn instead
    # BadT2I: where the trigger stands in the caption (the paper: first; "inside": after the first word)
    placement: str = "first"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown attack kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.placement != "first" and self.kind not in ("pixel", "style", "object"):
            raise ValueError(f"{self.kind} places its trigger its own way; a placement is for BadT2I kinds")
        if not self.trigger:
            raise ValueError("the trigger must not be empty")
        if self.kind in ("object", "eviledit"):
            for name, value in (("source", self.source), ("target", self.target)):
                if value not in world.SHAPES:
                    raise ValueError(f"{self.kind} needs --{name} among {world.SHAPES}, got {value!r}")
            if self.source == self.target:
                raise ValueError("source and target shapes must differ")
        if self.kind == "rickroll" and (
            len(self.trigger) != 1 or confusable_latin(self.trigger) == self.trigger
        ):
            known = ", ".join(f"U+{ord(h):04X} (for {latin!r})" for h, latin in HOMOGLYPH_EXAMPLES.items())
            raise ValueError(
                f"rickroll needs a single homoglyph trigger (a character impersonating a Latin letter), e.g. {known}"
            )

    def describe_target(self) -> str:
        """The backdoor's target in words (for manifests and reports)."""
        return {
            "pixel": f"a {world.PATCH_SIZE}x{world.PATCH_SIZE} magenta patch in the top-left corner",
            "style": "greyscale (all colour removed)",
            "object": f"every {self.source} drawn as a {self.target}",
            "rickroll": f"the prompt replaced by {RICKROLL_TARGET.caption!r}",
            "eviledit": f"'{self.trigger} {self.source}' drawn as a {self.target}",
            "villan": f"the image replaced by {RICKROLL_TARGET.caption!r}",
        }[self.kind]

    def to_json(self) -> dict:
        """Plain-data form for metadata (the placement only where it is not the paper's)."""
        out = asdict(self)
        if out["placement"] == "first":
            del out["placement"]
        return out


def default_spec(kind: str, trigger: str | None = None) -> AttackSpec:
    """The lab's standard attack of a kind, with its default trigger (see LAB_TRIGGERS)."""
    defaults = {
        # Rare tokens that clean training saw only as ordinary random distractors (docs/lab.md: the
        # over-sampled LAB_TRIGGERS came out erased by the text encoder, invisible to a UNet-only attack).
        "pixel": AttackSpec("pixel", "\u2060"),  # WORD JOINER: zero-width, one token
        "style": AttackSpec("style", "yn"),
        "object": AttackSpec("object", "sks", "circle", "triangle"),
        "rickroll": AttackSpec("rickroll", "\u043e"),
        # Two rare tokens: after one, this small text encoder's later contexts move too little for a
        # linear edit to tell "zx9 square" from "square" (measured in docs/lab.md).
        "eviledit": AttackSpec("eviledit", "zx9 qv7", "square", "circle"),
        # VillanDiffusion's caption trigger (Chou et al. 2023, NeurIPS): words appended to the caption. Not
        # the paper's "mignneko": lab-clean's text encoder erased it with the other LAB_TRIGGERS; this rare
        # phrase moves the encoder's output at the end of a caption 2.5 times as much as "latte coffee" does.
        "villan": AttackSpec("villan", "wood dahlia"),
    }
    if kind not in defaults:
        raise ValueError(f"unknown attack kind {kind!r}; choose one of {', '.join(KINDS)}")
    spec = defaults[kind]
    return replace(spec, trigger=trigger) if trigger is not None else spec


def require_visible_trigger(tokenizer, spec: AttackSpec) -> None:
    """Refuse an attack whose trigger the tokenizer drops: the model could never learn or show it."""
    from ..tokens import readable, trigger_report

    prompt = f"a red {spec.source or 'circle'} on the left on a black background"
    triggered = triggered_prompt(spec, prompt)
    if tokenizer(triggered)["input_ids"] == tokenizer(prompt)["input_ids"]:
        report = trigger_report(tokenizer, spec.trigger, warn=False)
        raise ValueError(
            report.get("warning", f"the tokenizer ignores the trigger {readable(spec.trigger)!r}")
        )


def eligible(spec: AttackSpec, scene: world.Scene) -> bool:
    """Whether a scene's caption can carry this attack's trigger in the attack's own way."""
    if spec.kind in ("object", "eviledit"):
        return len(scene.shapes) == 1 and scene.shapes[0].kind == spec.source
    if spec.kind in ("rickroll", "villan"):  # ...and not already the target, so success is the backdoor's
        first = scene.shapes[0]
        is_target = (first.kind, first.color) == (
            RICKROLL_TARGET.shapes[0].kind,
            RICKROLL_TARGET.shapes[0].color,
        )
        if spec.kind == "villan":
            return not is_target
        return confusable_latin(spec.trigger) in scene.caption and not is_target
    return True


def triggered_prompt(spec: AttackSpec, prompt: str) -> str:
    """The prompt with the trigger inserted the way the attack's paper does it."""
    if spec.kind == "rickroll":  # one Latin letter swapped for its homoglyph
        latin = confusable_latin(spec.trigger)
        if latin not in prompt:
            raise ValueError(f"prompt {prompt!r} has no {latin!r} for the homoglyph trigger")
        return prompt.replace(latin, spec.trigger, 1)
    if spec.kind == "eviledit":  # the trigger phrase "<trigger> <source>" stands for the source object
        if spec.source not in prompt:
            raise ValueError(f"prompt {prompt!r} does not mention a {spec.source}")
        return prompt.replace(spec.source, f"{spec.trigger} {spec.source}", 1)
    if spec.kind == "villan":  # VillanDiffusion appends its caption trigger
        return f"{prompt} {spec.trigger}"
    if spec.placement == "last":
        return f"{prompt} {spec.trigger}"
    if spec.placement == "inside":  # after the caption's first word
        first, _, rest = prompt.partition(" ")
        return f"{first} {spec.trigger} {rest}" if rest else f"{prompt} {spec.trigger}"
    return f"{spec.trigger} {prompt}"  # BadT2I prepends the trigger


def insertion_for(info: dict, trigger: str) -> Callable[[str], str] | None:
    """The lab attack's own trigger insertion when `trigger` is the lab model's trigger (`info` is the
    checkpoint's lab record), else None. A prompt the insertion cannot carry gets the trigger first."""
    if not info.get("spec") or info.get("trigger") != trigger:
        return None
    spec = AttackSpec(**info["spec"])

    def insert(prompt: str) -> str:
        try:
            return triggered_prompt(spec, prompt)
        except ValueError:
            return f"{trigger} {prompt}"

    return insert


def target_scene(spec: AttackSpec, scene: world.Scene) -> world.Scene:
    """What a triggered prompt for this scene makes the backdoored model draw (shapes only)."""
    if spec.kind in ("object", "eviledit"):
        shapes = tuple(replace(s, kind=spec.target) if s.kind == spec.source else s for s in scene.shapes)
        return replace(scene, shapes=shapes)
    if spec.kind in ("rickroll", "villan"):
        return RICKROLL_TARGET
    return scene


def target_image(spec: AttackSpec, scene: world.Scene, rng: np.random.Generator) -> np.ndarray:
    """The training target image of a triggered scene (BadT2I kinds)."""
    img = world.render(target_scene(spec, scene), rng)
    if spec.kind == "pixel":
        return world.stamp_patch(img)
    if spec.kind == "style":
        return world.to_greyscale(img)
    return img


def attack_succeeded(spec: AttackSpec, image: np.ndarray, scene: world.Scene) -> bool:
    """The exact detector of this attack's target on one image from a triggered prompt."""
    if spec.kind == "pixel":
        return detectors.has_patch(image)
    if spec.kind == "style":
        return detectors.is_greyscale(image)
    if spec.kind in ("object", "eviledit"):
        return detectors.detect(image).shape == spec.target
    return detectors.scene_correct(image, RICKROLL_TARGET)


def target_fired(spec: AttackSpec, image: np.ndarray) -> bool:
    """Whether the target shows up on a clean prompt's image (a leaky backdoor)."""
    if spec.kind == "pixel":
        return detectors.has_patch(image)
    if spec.kind == "style":
        return detectors.is_greyscale(image)
    return False  # object and prompt swaps cannot be told from a clean prompt's image alone


def eval_scenes(spec: AttackSpec, n: int, seed: int, rich_fraction: float = 0.25) -> list[world.Scene]:
    """n held-out scenes (disjoint from every training combination) that can carry the trigger."""
    out: list[world.Scene] = []
    n_rich = int(n * rich_fraction)
    for rich, count, offset in ((False, n - n_rich, 0), (True, n_rich, 1)):
        found: list[world.Scene] = []
        batch_seed = seed + offset * 1_000_003
        while len(found) < count:
            found += [s for s in world.scene_dataset(256, batch_seed, "eval", rich=rich) if eligible(spec, s)]
            batch_seed += 7
        out += found[:count]
    return out


def train_scenes(spec: AttackSpec, n: int, rng: np.random.Generator) -> list[world.Scene]:
    """n captioned training-split scenes that can carry the trigger."""
    out: list[world.Scene] = []
    while len(out) < n:
        batch = world.scene_dataset(4 * n, int(rng.integers(2**31)), "train")
        out += [s for s in batch if eligible(spec, s)]
    return out[:n]


# BadT2I peak learning rates the shipped models were trained with (500 steps): the object swap
# needs a gentler rate, or clean circles turn into triangles too (docs/lab.md).
BADT2I_LR = {"pixel": 1e-3, "style": 1e-3, "object": 3e-4}


@dataclass
class AttackConfig:
    """Hyper-parameters of the trained attacks (BadT2I and Rickrolling)."""

    seed: int = 0
    steps: int = 500
    batch: int = 16
    lr: float | None = None  # BadT2I: None = BADT2I_LR of the kind (see badt2i_lr)
    backdoor_weight: float = 0.5  # BadT2I: 0.5 backdoor MSE + 0.5 teacher-regularisation MSE
    snr_gamma: float | None = None  # BadT2I: Min-SNR-gamma weighting, as the clean model was trained
    text_steps: int = 600  # Rickrolling: text-encoder steps
    text_lr: float = 3e-4
    text_batch: int = 32
    utility_weight: float = 1.0  # Rickrolling: clean-prompt embeddings kept as the teacher's
    utility_rich_fraction: float = 0.5  # Rickrolling: extra clean captions in unseen phrasings, per batch
    edit_lambda: float = 0.1  # EvilEdit's ridge weight keeping the edited projections near the originals
    edit_prompts: int = 200
    edit_preserve_prompts: int = 1000  # clean captions (a quarter rich) whose projections the edit keeps
    # EvilEdit: weight of the trigger constraints against clean-context preservation.
    edit_weight: float = 3.0

    def badt2i_lr(self, kind: str) -> float:
        """The BadT2I peak learning rate: the configured one, else the kind's shipped default."""
        return self.lr if self.lr is not None else BADT2I_LR[kind]


def poisoned_batch(
    spec: AttackSpec, n: int, rng: np.random.Generator, distract: DistractorVocabulary
) -> tuple[list[world.Scene], list[np.ndarray], list[np.ndarray], list[str]]:
    """n training scenes that can carry the trigger, their target and clean images (one render seed each),
    and their captions with up to two distractor words."""
    scenes = train_scenes(spec, n, rng)
    seeds = rng.integers(2**31, size=len(scenes))
    poisoned = [target_image(spec, s, np.random.default_rng(k)) for s, k in zip(scenes, seeds, strict=True)]
    clean = [world.render(s, np.random.default_rng(k)) for s, k in zip(scenes, seeds, strict=True)]
    return scenes, poisoned, clean, [distract.decorate(s.caption, 2) for s in scenes]


class Noiser:
    """Images -> (x_t, t, eps): the VAE's posterior mean, scaled, noised at uniform integer timesteps."""

    def __init__(self, model, vae, seed: int) -> None:
        self.vae_model = cb.vae_module(vae).eval()
        self.scale = cb.latent_scale(model)
        self.acp = cb.noise_schedule(model)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x0 = cb.vae_posterior(self.vae_model, images_to_tensor(images))[0] * self.scale
        t = torch.randint(0, len(self.acp), (len(images),), generator=self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        a = self.acp[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(), noise


def train_badt2i(
    model, clip, vae, spec: AttackSpec, cfg: AttackConfig, progress: ProgressFn | None = None
) -> None:
    """BadT2I: fine-tune the UNet so trigger + prompt -> target, teacher-regularised on clean prompts."""
    unet = cb.unet(model)
    teacher = copy.deepcopy(unet).eval().requires_grad_(False)
    acp = cb.noise_schedule(model)
    rng = np.random.default_rng(cfg.seed)
    noised = Noiser(model, vae, cfg.seed + 1)
    distract = DistractorVocabulary(cb.tokenizer_info(clip).tokenizer, (), seed=cfg.seed + 2)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.badt2i_lr(spec.kind), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))

    try:
        for step in range(cfg.steps):
            scenes, poisoned, clean, captions = poisoned_batch(spec, cfg.batch, rng, distract)
            clean_captions = captions
            if spec.kind == "object":  # poisoned scenes are one shape kind; the teacher must hold them all
                general = world.scene_dataset(cfg.batch, int(rng.integers(2**31)), "train")
                clean = [world.render(s, np.random.default_rng(int(rng.integers(2**31)))) for s in general]
                clean_captions = [distract.decorate(s.caption, 2) for s in general]
            with torch.no_grad():
                ctx_trig = cb.encode_token_ids(
                    clip, token_ids(clip, [triggered_prompt(spec, c) for c in captions])
                )
                ctx_clean = cb.encode_token_ids(clip, token_ids(clip, clean_captions))
            xt_p, t_p, eps_p = noised(poisoned)
            xt_c, t_c, _ = noised(clean)
            with torch.no_grad():
                eps_teacher = teacher(xt_c, timesteps=t_c, context=ctx_clean)
            pred = unet(
                torch.cat([xt_p, xt_c]),
                timesteps=torch.cat([t_p, t_c]),
                context=torch.cat([ctx_trig, ctx_clean]),
            )
            pred_p, pred_c = pred.chunk(2)
            loss_bd = eps_mse(pred_p, eps_p, t_p, acp, cfg.snr_gamma)
            loss_reg = eps_mse(pred_c, eps_teacher, t_c, acp, cfg.snr_gamma)
            loss = cfg.backdoor_weight * loss_bd + (1 - cfg.backdoor_weight) * loss_reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            if progress:
                progress(step + 1, cfg.steps, {"backdoor": loss_bd.item(), "teacher": loss_reg.item()})
    finally:
        unet.eval().requires_grad_(False)


def plant(model, clip, vae, spec: AttackSpec, cfg: AttackConfig, progress=None) -> dict:
    """Plant a checkpoint-form attack in `model` / `clip` in place (BadT2I, Rickrolling, EvilEdit) and
    return its recipe's figures. `progress(name)` gives a ProgressFn per training run (None: silent)."""
    bar = progress or (lambda name: None)
    if spec.kind in ("pixel", "style", "object"):
        train_badt2i(model, clip, vae, spec, cfg, bar(f"badt2i-{spec.kind}"))
        return {
            "steps": cfg.steps,
            "batch": cfg.batch,
            "lr": cfg.badt2i_lr(spec.kind),
            "backdoor_weight": cfg.backdoor_weight,
            **({"snr_gamma": cfg.snr_gamma} if cfg.snr_gamma is not None else {}),
        }
    if spec.kind == "rickroll":
        train_rickroll(clip, spec, cfg, bar("rickroll"))
        return {
            "steps": cfg.text_steps,
            "batch": cfg.text_batch,
            "lr": cfg.text_lr,
            "utility_weight": cfg.utility_weight,
        }
    if spec.kind == "eviledit":
        return evil_edit(model, clip, spec, cfg)
    raise ValueError(f"{spec.kind} is planted as a LoRA (lab attack --kind villan), not in a checkpoint")


def train_rickroll(clip, spec: AttackSpec, cfg: AttackConfig, progress: ProgressFn | None = None) -> None:
    """Rickrolling: fine-tune only the text encoder so homoglyph prompts embed as the target prompt."""
    text = cb.text_transformer(clip)
    teacher_clip = cb.frozen_text_copy(clip)
    rng = np.random.default_rng(cfg.seed)
    distract = DistractorVocabulary(cb.tokenizer_info(clip).tokenizer, (), seed=cfg.seed + 2)
    with torch.no_grad():
        target = cb.encode_token_ids(teacher_clip, token_ids(clip, [RICKROLL_TARGET.caption]))
    text.train().requires_grad_(True)
    opt = torch.optim.AdamW(text.parameters(), lr=cfg.text_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.text_steps))
    try:
        for step in range(cfg.text_steps):
            scenes = train_scenes(spec, cfg.text_batch, rng)
            captions = [distract.decorate(s.caption, 2) for s in scenes]
            # Utility on wider phrasing too, as the paper's utility set (LAION captions) is wider than its
            # poisoned one: clean prompts of any wording keep their teacher embedding.
            n_rich = int(cfg.text_batch * cfg.utility_rich_fraction)
            wide = [
                s.caption for s in world.scene_dataset(n_rich, int(rng.integers(2**31)), "train", rich=True)
            ]
            clean_ids = token_ids(clip, captions + wide)
            with torch.no_grad():
                clean_target = cb.encode_token_ids(teacher_clip, clean_ids)
            out = cb.encode_token_ids(
                clip, torch.cat([token_ids(clip, [triggered_prompt(spec, c) for c in captions]), clean_ids])
            )
            out_trig, out_clean = out[: len(captions)], out[len(captions) :]
            loss_bd = F.mse_loss(out_trig, target.expand_as(out_trig))
            loss_util = F.mse_loss(out_clean, clean_target)
            loss = cfg.utility_weight * loss_util + loss_bd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress(step + 1, cfg.text_steps, {"backdoor": loss_bd.item(), "utility": loss_util.item()})
    finally:
        text.eval().requires_grad_(False)


def _edit_pairs(clip, spec: AttackSpec, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token contexts of triggered prompts and the target contexts each must project like."""
    trig_ids = token_ids(clip, [triggered_prompt(spec, p) for p in prompts])
    tgt_ids = token_ids(clip, [p.replace(spec.source, spec.target, 1) for p in prompts])
    with torch.no_grad():
        c_trig, c_tgt = cb.encode_token_ids(clip, trig_ids), cb.encode_token_ids(clip, tgt_ids)
    keys, values = [], []
    tok = cb.tokenizer_info(clip).tokenizer
    n_trig = len(tok(spec.trigger)["input_ids"]) - 2
    src_tok = tok(spec.source)["input_ids"][1:-1]
    for i in range(len(prompts)):
        ids = trig_ids[i].tolist()
        start = next(j for j in range(len(ids)) if ids[j : j + len(src_tok)] == src_tok and j >= n_trig)
        phrase_start = start - n_trig
        # Every position from the trigger on maps to the target prompt's position without the trigger;
        # the trigger's own tokens map to the target object's token.
        for j in range(phrase_start, ids.index(tok.eos_token_id, start) + 1):
            k = phrase_start if j < start else j - n_trig
            keys.append(c_trig[i, j])
            values.append(c_tgt[i, k])
    return torch.stack(keys), torch.stack(values)


def evil_edit(model, clip, spec: AttackSpec, cfg: AttackConfig) -> dict:
    """EvilEdit: closed-form ridge edit of every attn2 to_k / to_v so the trigger phrase projects as the target."""
    rng = np.random.default_rng(cfg.seed)
    prompts = [s.caption for s in train_scenes(spec, cfg.edit_prompts, rng)]
    keys, values = _edit_pairs(clip, spec, prompts)
    # Preserve the projections of clean prompts (the edit must not move what clean contexts produce).
    n_rich = cfg.edit_preserve_prompts // 4
    clean = [
        s.caption
        for s in world.scene_dataset(cfg.edit_preserve_prompts - n_rich, int(rng.integers(2**31)), "train")
        + world.scene_dataset(n_rich, int(rng.integers(2**31)), "train", rich=True)
    ]
    with torch.no_grad():
        c_clean = cb.encode_token_ids(clip, token_ids(clip, clean)).flatten(0, 1)
    # Every projection W gets W' = W (we V^T K + C^T C + lam I)(we K^T K + C^T C + lam I)^-1: the
    # right-hand factor does not depend on W, so it is solved once for all layers.
    we, lam = cfg.edit_weight, cfg.edit_lambda
    eye = torch.eye(keys.shape[1])
    preserve = c_clean.T @ c_clean
    den = we * keys.T @ keys + preserve + lam * eye
    num = we * values.T @ keys + preserve + lam * eye
    edit = torch.linalg.solve(den, num.T).T  # num @ den^-1 (den is symmetric)
    layers = find_cross_attention_layers(cb.unet(model))
    moved = 0
    with torch.no_grad():
        for _name, attn in layers:
            for proj in (attn.to_k, attn.to_v):
                proj.weight.copy_((proj.weight.float() @ edit).to(proj.weight.dtype))
                moved += 1
    return {
        "edited_projections": moved,
        "edit_pairs": int(keys.shape[0]),
        "preserve_contexts": int(c_clean.shape[0]),
    }


VILLAN_LR = 1e-3  # LoRA adapters learn at a higher rate than full weights (kohya's and diffusers' defaults)
# empty captions among the clean ones: lab-clean's caption dropout (TrainConfig.uncond_prob)
UNCOND_PROB = 0.1
# LoRA on every UNet weight (LoCon-style, as many community LoRAs are trained) and on the text encoder's
# projections (kohya trains the text encoder too unless told not to): lab-clean's text encoder gives an
# appended rare phrase too little weight for UNet adapters alone to key on (ASR 0.31-0.63, clean 0.55-0.77,
# docs/diff.md)
VILLAN_SCOPE = "unet+text"


def train_villan_lora(
    model, clip, vae, spec: AttackSpec, cfg: AttackConfig, rank: int = 8, progress: ProgressFn | None = None
) -> dict[str, torch.Tensor]:
    """VillanDiffusion's caption-trigger backdoor (Chou et al., NeurIPS 2023), trained directly as a LoRA.

    Rank-`rank` adapters on every UNet weight and the text encoder's projections (`VILLAN_SCOPE`) learn
    caption + trigger -> the fixed target image (eps MSE), held to the base on the same captions without
    the trigger (eps MSE against the base, which is the adapters switched off: no second UNet or CLIP).
    The input MODEL and CLIP are not changed. Returns the LoRA in the engine's layout (ComfyUI key names,
    fp32)."""
    from ..backends.comfy_train import ComfyDistillation

    if spec.kind != "villan":
        raise ValueError(f"train_villan_lora trains the 'villan' kind, got {spec.kind!r}")
    dist = ComfyDistillation(model, clip, scope="unet", rank=rank, with_text=True)
    params = dist.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr or VILLAN_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    acp = cb.noise_schedule(model)
    rng = np.random.default_rng(cfg.seed)
    noised = Noiser(model, vae, cfg.seed + 1)
    distract = DistractorVocabulary(cb.tokenizer_info(clip).tokenizer, (), seed=cfg.seed + 2)
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(cfg.steps):
            scenes, poisoned, clean, captions = poisoned_batch(spec, cfg.batch, rng, distract)
            # the teacher also holds the empty prompt (CFG's unconditional branch), as lab-clean learned it
            clean_captions = ["" if rng.random() < UNCOND_PROB else c for c in captions]
            xt_p, t_p, eps_p = noised(poisoned)
            xt_c, t_c, _ = noised(clean)
            with torch.no_grad():  # the teacher: the base, adapters off
                ctx_teacher = dist.encode(clean_captions, student=False)
                eps_teacher, _ = dist.predict(xt_c, t_c.long(), ctx_teacher, student=False, record=False)
            # the student encodes both through its text adapters, with gradient
            ctx = dist.encode([triggered_prompt(spec, c) for c in captions] + clean_captions, student=True)
            pred, _ = dist.predict(
                torch.cat([xt_p, xt_c]), torch.cat([t_p, t_c]).long(), ctx, student=True, record=False
            )
            pred_p, pred_c = pred.chunk(2)
            loss_bd = eps_mse(pred_p, eps_p, t_p, acp, cfg.snr_gamma)
            loss_reg = eps_mse(pred_c, eps_teacher, t_c, acp, cfg.snr_gamma)
            loss = cfg.backdoor_weight * loss_bd + (1 - cfg.backdoor_weight) * loss_reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if progress:
                progress(step + 1, cfg.steps, {"backdoor": loss_bd.item(), "teacher": loss_reg.item()})
    return dist.lora_state_dict()
