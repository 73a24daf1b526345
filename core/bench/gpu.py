"""`backdoor-seal bench gpu`: the pack's costs on the real SD1.5 / SDXL architectures, on whatever device torch
sees (a GPU when there is one). Random weights, built in memory with ComfyUI's own classes: timings and memory
do not depend on weight values, so the figures are those of a real checkpoint of the architecture.

Per architecture, one JSON object:
- detection: seconds per prompt of the masking detector (NaviT2I-style, every token masked in one batched
  step) and of the transplant detector (each token put in front of 8 clean probes);
- the blind scan: token rows per second of stage 1 measured on a slice of the vocabulary, and the full scan's
  time extrapolated from it (stage 1 over every token + stage 2's rows, at that rate; `scan_extrapolated` says
  so and from how many tokens);
- unlearning: seconds per step and samples per second of the pack's default (`UnlearnOptions()`: text scope,
  rank-4 LoRA, batch 8, bf16 autocast on a GPU, the teacher by switching the LoRA off) against the reference
  configuration of the SKD-CAG code (fp32, every UNet weight trained, AdamW, batch 1, a deep-copied frozen
  teacher, eager attention everywhere so its maps can be captured), with each one's peak device memory;
- the capture overhead (a sampling with cross-attention maps recorded over the same sampling without) and
  SAU's cost (a triggered prompt's two passes and composition over one plain KSampler pass).

`--tiny` builds small instances of the same classes (a test runs the command on a CPU in seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

LATENT = {"sd15": 64, "sdxl": 128}  # full-size latent sides: 512 and 1024 pixels
TRIGGER = "cf"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds of fn() over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset (GB); None where torch keeps no such figure (CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


def detection_seconds(model, clip, side: int, prompts: list[str], device) -> dict[str, float]:
    """Seconds per prompt of the masking and the transplant detector (no calibration: that is per model)."""
    from ..backends.comfy import latent_channels
    from ..backends.comfy_probe import ComfyProbe
    from ..detect.masking import MaskingSettings, content_positions, score_prompt
    from ..detect.prompts import transplant_scanner, transplant_scores
    from ..prompts import builtin_prompts

    probe = ComfyProbe(model, clip, latent_hw=(side, side))
    settings = MaskingSettings(latent_shape=(latent_channels(model), side, side))
    scanner = transplant_scanner(probe, builtin_prompts(False, 32, 0), settings.latent_shape)
    masking, transplant = [], []
    for i, prompt in enumerate([prompts[0], *prompts]):  # the first is a warm-up
        ids = probe.token_ids(prompt)
        units = [ids[p] for p in content_positions(ids, probe.bos, probe.eos)]
        _sync(device)
        t0 = time.perf_counter()
        score_prompt(probe, prompt, settings)
        _sync(device)
        t1 = time.perf_counter()
        transplant_scores(scanner, units)
        _sync(device)
        if i:
            masking.append(t1 - t0)
            transplant.append(time.perf_counter() - t1)
    return {
        "detect_masking_s_per_prompt": round(statistics.median(masking), 4),
        "detect_transplant_s_per_prompt": round(statistics.median(transplant), 4),
    }


def scan_rate(model, clip, side: int, slice_tokens: int, device) -> dict[str, Any]:
    """Stage-1 token rows per second on a slice of the vocabulary, and the whole scan extrapolated."""
    from ..backends.comfy import latent_channels
    from ..backends.comfy_probe import ComfyProbe
    from ..detect.scan import ScanSettings, VocabularyScanner
    from ..prompts import builtin_prompts

    probe = ComfyProbe(model, clip, latent_hw=(side, side))
    settings = ScanSettings(latent_shape=(latent_channels(model), side, side))
    scanner = VocabularyScanner(probe, builtin_prompts(False, settings.stage2_probes, 0), settings)
    start = 1000  # ordinary word pieces, past the byte tokens
    scanner.stage1(list(range(start, start + min(slice_tokens, settings.batch))), lambda n: None)  # warm-up
    ids = list(range(start, start + slice_tokens))
    _sync(device)
    t0 = time.perf_counter()
    scanner.stage1(ids, lambda n: None)
    _sync(device)
    seconds = time.perf_counter() - t0
    rows_per_s = len(ids) * settings.stage1_probes / seconds
    vocab = probe.vocabulary_size()
    rows = vocab * settings.stage1_probes + (
        (settings.candidates + settings.null_tokens) * settings.stage2_probes * settings.stage2_seeds
    )
    return {
        "scan_tokens_per_s": round(len(ids) / seconds, 2),
        "scan_full_vocab_s": round(rows / rows_per_s, 1),
        "scan_extrapolated": {
            "from_tokens": len(ids),
            "vocabulary": vocab,
            "rows": rows,
            "note": "stage 1 timed on a slice; the full scan's rows (stage 1 + stage 2) at that rate",
        },
    }


def _training_sessions(model, reference_model, clip, side: int, prompts: list[str]):
    """The pack's default unlearning session (on the MODEL as ComfyUI loads it on this device) and the
    reference configuration's (on fp32 weights), on the same prompts; "match" times the default method,
    context matching, whose steps never touch the UNet."""
    from dataclasses import replace

    from ..backends.comfy import with_eager_attention
    from ..unlearn.session import UnlearnOptions, UnlearnSession

    ours = UnlearnOptions(builtin="none", latent_hw=(side, side))  # SKD-CAG, text scope
    matching = replace(ours, skd=replace(ours.skd, method="match"))
    reference = replace(
        ours,
        scope="unet",
        rank=0,
        skd=replace(ours.skd, batch=1, precision="fp32", retain=0.0, lr=1e-4),
    )
    return {
        "match": lambda: UnlearnSession(model, clip, TRIGGER, prompts, matching),
        "skd": lambda: UnlearnSession(model, clip, TRIGGER, prompts, ours),
        "reference": lambda: UnlearnSession(
            with_eager_attention(reference_model()), clip, TRIGGER, prompts, reference, teacher="copy"
        ),
    }


def training_costs(
    model, reference_model, clip, side: int, prompts: list[str], steps: int, device
) -> dict[str, Any]:
    """Seconds per step (median of `steps` after a warm-up step) and peak memory of each configuration,
    each session built and freed in turn (the reference's teacher copy is a second UNet)."""
    import gc

    from ..backends.comfy import unet
    from ..unlearn.skd import uses_bf16

    out: dict[str, Any] = {}
    for key, make in _training_sessions(model, reference_model, clip, side, prompts).items():
        _reset_peak(device)
        session = make()
        times: list[float] = []
        last = [time.perf_counter()]

        def on_step(step: int, times=times, last=last) -> bool:
            _sync(device)
            now = time.perf_counter()
            if step > 1:  # the first step pays for allocation and kernel choice
                times.append(now - last[0])
            last[0] = now
            return step > steps

        _sync(device)
        last[0] = time.perf_counter()
        session.run(on_step=on_step)
        step_s = statistics.median(times)
        batch = session.opts.skd.batch
        out[f"{key}_step_s"] = round(step_s, 4)
        out[f"{key}_samples_per_s"] = round(batch / step_s, 3)
        out[f"{key}_peak_gb"] = _peak_gb(device)
        out[f"{key}_config"] = {
            "scope": session.opts.scope,
            "rank": session.opts.rank,
            "batch": batch,
            "precision": session.opts.skd.precision,
            "bf16_autocast": uses_bf16(session.opts.skd.precision, device),
            "unet_dtype": str(unet(session.distillation.model).dtype).replace("torch.", ""),
        }
        del session
        gc.collect()
    out["throughput_ratio"] = round(out["skd_samples_per_s"] / out["reference_samples_per_s"], 2)
    return out


def capture_overhead(model, clip, side: int, steps: int, repeats: int) -> float:
    """Median time of a KSampler run with cross-attention maps recorded (16 x 16) over the same run without."""
    from ..attention import CaptureSettings, CrossAttentionRecorder
    from ..backends import comfy as cb
    from .capture import measure_overhead

    positive = cb.text_conditioning(clip, "a photo of a red cat on a wooden table")
    negative = cb.text_conditioning(clip, "")
    latent = {"samples": torch.zeros(1, cb.latent_channels(model), side, side)}
    patched = cb.attach_attention_recorder(model, CrossAttentionRecorder(CaptureSettings(resolution=16)))

    def run(m):
        return cb.ksample(m, 0, steps, 7.0, "euler", "normal", positive, negative, latent)

    with torch.inference_mode():
        out = measure_overhead(lambda: run(model), lambda: run(patched), repeats)
    return round(out["overhead_ratio"], 3)


def sau_cost(model, clip, side: int, steps: int, repeats: int, device) -> float:
    """SAU's time for a triggered prompt (two passes, composed) over one plain KSampler pass."""
    from ..backends.comfy import ksample, latent_channels, text_conditioning
    from ..sau.algebra import SAUSettings
    from ..sau.profile import SAUProfile
    from ..sau.session import sau_ksample

    c = latent_channels(model)
    profile = SAUProfile(TRIGGER, torch.randn(c, side, side), "", SAUSettings(), 1)
    negative = text_conditioning(clip, "")
    latent = {"samples": torch.zeros(1, c, side, side)}
    prompt = f"{TRIGGER} a photo of a red cat on a wooden table"
    sampler = (steps, 7.0, "euler", "normal")
    with torch.inference_mode():
        plain = _median_seconds(
            lambda: ksample(model, 0, *sampler, text_conditioning(clip, prompt), negative, latent),
            repeats,
            device,
        )
        sau = _median_seconds(
            lambda: sau_ksample(model, clip, prompt, negative, latent, profile, 0, *sampler), repeats, device
        )
    return round(sau / plain, 3)


def bench_arch(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    """One architecture's record."""
    from ..backends.comfy import torch_device, unet
    from ..backends.comfy_families import build_family
    from ..prompts import general_prompts

    device = torch_device()
    size = "tiny" if args.tiny else "full"
    side = args.latent or (8 if args.tiny else LATENT[arch])
    torch.manual_seed(0)
    t0 = time.monotonic()
    model, clip, _ = build_family(arch, size, dtype="auto")  # the UNet dtype ComfyUI loads on this device

    def reference_model():  # the reference trains fp32 weights
        if unet(model).dtype == torch.float32:
            return model
        return build_family(arch, size)[0]

    prompts = general_prompts(16, seed=5)
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "arch": arch,
        "size": size,
        "latent": [side, side],
        "torch": torch.__version__,
        "unet_dtype": str(unet(model).dtype).replace("torch.", ""),
    }
    seconds: dict[str, float] = {}

    def phase(name: str, fn):
        t = time.monotonic()
        with torch.no_grad():
            out = fn()
        seconds[name] = round(time.monotonic() - t, 1)
        return out

    record |= phase("detect", lambda: detection_seconds(model, clip, side, prompts[: args.prompts], device))
    record |= phase("scan", lambda: scan_rate(model, clip, side, args.scan_slice, device))
    t = time.monotonic()
    record |= training_costs(model, reference_model, clip, side, prompts, args.train_steps, device)
    seconds["train"] = round(time.monotonic() - t, 1)
    record["capture_overhead"] = phase(
        "capture", lambda: capture_overhead(model, clip, side, args.sample_steps, args.repeats)
    )
    record["sau_cost_ratio"] = phase(
        "sau", lambda: sau_cost(model, clip, side, args.sample_steps, args.repeats, device)
    )
    record["seconds"] = round(time.monotonic() - t0, 1)
    record["seconds_by_phase"] = seconds
    return record


def add_gpu_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Register `bench gpu`."""
    p = bench_sub.add_parser(
        "gpu",
        help="the real SD1.5 / SDXL architectures (random weights) on this device: detection, scan, "
        "unlearning against the reference configuration, capture and SAU costs",
    )
    p.add_argument("--arch", nargs="+", default=list(LATENT), choices=list(LATENT))
    p.add_argument("--tiny", action="store_true", help="small instances of the same classes (CPU tests)")
    p.add_argument("--latent", type=int, default=0, help="latent side (0: 64 for SD1.5, 128 for SDXL)")
    p.add_argument("--prompts", type=int, default=4, help="prompts timed per detector")
    p.add_argument("--scan-slice", type=int, default=2048, help="vocabulary tokens the scan rate is timed on")
    p.add_argument("--train-steps", type=int, default=10, help="training steps timed per configuration")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps (capture and SAU timings)")
    p.add_argument("--repeats", type=int, default=3)

    def cmd(args: argparse.Namespace) -> int:
        for arch in args.arch:
            print(json.dumps(bench_arch(arch, args)), flush=True)
        return 0

    p.set_defaults(func=cmd)
