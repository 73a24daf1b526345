"""Clean training of the lab model family on CPU: the VAE, then the UNet and text encoder jointly."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import comfy as cb
from ..images import images_to_tensor, tensor_to_images
from . import world

ProgressFn = Callable[[int, int, dict], None]

# Words over-sampled among the distractors of clean training (15% of draws; part of the shipped
# lab-clean's recipe). Measured afterwards: the text encoder erases these far more than a typical
# token, so the shipped BadT2I attacks use rare tokens that clean training saw only as ordinary
# random distractors instead (docs/lab.md).
LAB_TRIGGERS = ("\u200b", "cf", "mignneko", "\u043e", "zx9")


@dataclass
class TrainConfig:
    """Hyper-parameters of clean lab training (the VAE part is validated: 97.7% reconstructions read correctly)."""

    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_latent_noise: float = 0.1
    vae_fg_weight: float = 10.0
    vae_l1: bool = False
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    text_lr: float = 5e-4
    uncond_prob: float = 0.1
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023); None = plain MSE
    max_distractors: int = 3
    triggers: tuple[str, ...] = field(default_factory=lambda: LAB_TRIGGERS)


class DistractorVocabulary:
    """Words decoded from random tokens of the whole CLIP vocabulary (plus the lab triggers)."""

    def __init__(self, tokenizer, triggers: tuple[str, ...], seed: int = 0):
        vocab = tokenizer.get_vocab()
        ids = sorted(i for t, i in vocab.items() if t.endswith("</w>") and t[:-4].isprintable())
        self.words = [tokenizer.decode([i]).strip() for i in ids]
        self.words = [w for w in self.words if w and " " not in w]
        self.triggers = triggers
        self.rng = np.random.default_rng(seed)

    def decorate(self, caption: str, max_words: int) -> str:
        """Insert 0..max_words distractors (sometimes a trigger) at random word boundaries."""
        words = caption.split(" ")
        for _ in range(int(self.rng.integers(0, max_words + 1))):
            use_trigger = self.triggers and self.rng.random() < 0.15
            w = (
                self.triggers[int(self.rng.integers(len(self.triggers)))]
                if use_trigger
                else self.words[int(self.rng.integers(len(self.words)))]
            )
            words.insert(int(self.rng.integers(0, len(words) + 1)), w)
        return " ".join(words)


def token_ids(clip, captions: list[str]) -> torch.Tensor:
    """Token ids (B x 77) exactly as ComfyUI's tokenizer produces them for these captions."""
    return torch.tensor([cb.chunk_ids(clip, c) for c in captions], dtype=torch.long)


def train_vae(vae, cfg: TrainConfig, progress: ProgressFn | None = None) -> float:
    """Train the lab VAE on rendered scenes; return the latent scale that gives unit-variance latents."""
    model = cb.vae_module(vae)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05
    )
    for step in range(cfg.vae_steps):
        imgs = []
        for _ in range(cfg.vae_batch):
            scene = world.random_scene(rng)
            img = world.render(scene, rng)
            r = rng.random()  # the VAE must also represent the attacks' targets
            img = world.stamp_patch(img) if r < 0.1 else world.to_greyscale(img) if r < 0.2 else img
            imgs.append(img)
        x = images_to_tensor(imgs)
        mean, _ = cb.vae_posterior(model, x)
        # A nearly deterministic autoencoder: a sampled posterior at this size lets the decoder ignore
        # the latent (shapes came back as blobs); small latent noise keeps the decoder robust instead.
        z = mean + cfg.vae_latent_noise * mean.detach().std() * torch.randn_like(mean)
        rec = cb.vae_reconstruct(model, z)
        # Shapes are a few percent of the pixels: weight them so colour and outline are learned first.
        bg = x[:, :, -1:, -1:]  # the bottom-right pixel is always background
        fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()
        err = (rec - x).abs() if cfg.vae_l1 else (rec - x) ** 2  # L1 keeps edges sharper than MSE
        loss = (err * (1 + cfg.vae_fg_weight * fg)).mean() + 1e-4 * mean.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step + 1, cfg.vae_steps, {"vae_loss": loss.item()})
    model.eval()
    with torch.no_grad():
        imgs = [world.render(world.random_scene(rng), rng) for _ in range(256)]
        mean, _ = cb.vae_posterior(model, images_to_tensor(imgs))
    return float(1.0 / mean.std())


def reconstruction_accuracy(vae, n: int = 128, seed: int = 5) -> dict:
    """How many held-out scenes the detectors still read correctly after encode -> decode."""
    from . import detectors

    scenes = world.scene_dataset(n, seed, "eval")
    model = cb.vae_module(vae).eval()
    with torch.no_grad():
        mean, _ = cb.vae_posterior(model, images_to_tensor([world.render(s) for s in scenes]))
        recs = tensor_to_images(cb.vae_reconstruct(model, mean))
    hits = [detectors.scene_correct(r, s) for r, s in zip(recs, scenes, strict=True)]
    read = [
        (detectors.detect(rec, region), shape)
        for rec, scene in zip(recs, scenes, strict=True)
        for shape, region in zip(scene.shapes, detectors.shape_regions(scene), strict=True)
    ]
    bg = [detectors.detect(r).bg == s.bg for r, s in zip(recs, scenes, strict=True)]
    return {
        "recon_accuracy": float(np.mean(hits)),
        "recon_shape": float(np.mean([d.shape == s.kind for d, s in read])),
        "recon_color": float(np.mean([d.color == s.color for d, s in read])),
        "recon_background": float(np.mean(bg)),
        "n_images": n,
    }


def warmup_cosine(total: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up over the first 5%, then cosine decay to zero."""
    warmup = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def eps_mse(
    pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, acp: torch.Tensor, snr_gamma: float | None
) -> torch.Tensor:
    """Plain MSE, or Min-SNR-gamma weighted (Hang et al. 2023) for eps prediction."""
    if snr_gamma is None:
        return F.mse_loss(pred, target)
    # weight min(SNR, gamma) / SNR: less effort on nearly clean latents
    snr = acp[t.long()] / (1 - acp[t.long()])
    weight = snr.clamp(max=snr_gamma) / snr
    return ((pred - target) ** 2).mean(dim=(1, 2, 3)).mul(weight.to(pred)).mean()


def train_diffusion(
    model, clip, vae, latent_scale: float, cfg: TrainConfig, progress: ProgressFn | None = None
) -> None:
    """Train UNet and text encoder jointly (eps prediction) on captioned scenes with distractors."""
    unet = cb.unet(model)
    text = cb.text_transformer(clip)
    vae_model = cb.vae_module(vae).eval()
    unet.train()
    text.train()
    # ComfyUI's SDClipModel freezes its parameters at construction; unfreeze for training.
    text.requires_grad_(True)
    unet.requires_grad_(True)
    opt = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": cfg.unet_lr},
            {"params": text.parameters(), "lr": cfg.text_lr},
        ],
        weight_decay=0.01,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.unet_steps))
    acp = cb.noise_schedule(model)
    rng = np.random.default_rng(cfg.seed + 1)
    distract = DistractorVocabulary(cb.tokenizer_info(clip).tokenizer, cfg.triggers, seed=cfg.seed + 2)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    t0 = time.monotonic()
    for step in range(cfg.unet_steps):
        scenes = world.scene_dataset(cfg.unet_batch, seed=int(rng.integers(2**31)), split="train")
        imgs = [world.render(s, rng) for s in scenes]
        captions = [
            "" if rng.random() < cfg.uncond_prob else distract.decorate(s.caption, cfg.max_distractors)
            for s in scenes
        ]
        with torch.no_grad():
            mean, _ = cb.vae_posterior(vae_model, images_to_tensor(imgs))
            x0 = mean * latent_scale
        t = torch.randint(0, len(acp), (len(scenes),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = cb.encode_token_ids(clip, token_ids(clip, captions))
        pred = unet(xt, timesteps=t.float(), context=context)
        loss = eps_mse(pred, noise, t, acp, cfg.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
        opt.step()
        sched.step()
        if progress:
            progress(step + 1, cfg.unet_steps, {"loss": loss.item(), "s": round(time.monotonic() - t0, 1)})
    unet.eval()
    text.eval()
    text.requires_grad_(False)
