"""Capture inside the workflows users build: grids that change mid-run (Kohya Deep Shrink), cond and
uncond in separate model calls, long prompts, another pack's attn2 patch in either order, and no
exception ever leaving the attention patch."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from backdoor_seal.core.attention import CaptureSettings, CrossAttentionRecorder


def _naive_maps(q, k, heads, hw):
    b, n, inner = q.shape
    d = inner // heads
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.view(b, -1, heads, d).transpose(1, 2)
    probs = ((qh @ kh.transpose(-1, -2)) / d**0.5).softmax(-1).mean(1)
    return probs.transpose(1, 2).reshape(b, k.shape[1], *hw)


def _capture_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message) for w in record if "capture" in str(w.message) or "attention maps" in str(w.message)
    ]


# --- the recorder on synthetic calls ----------------------------------------------------------------


def test_a_layer_whose_grid_changes_keeps_maps_per_grid_and_weights_them_by_calls():
    """Deep Shrink: the middle block runs at 2x2 while the shrink is on, at 4x4 after (before the fix:
    RuntimeError 'attention maps of shape (1, 16, 77) do not match the (1, 4, 77) already recorded')."""
    g = torch.Generator().manual_seed(0)
    rec = CrossAttentionRecorder(CaptureSettings(resolution=8))
    k = torch.randn(1, 77, 16, generator=g)
    small = [torch.randn(1, 4, 16, generator=g) for _ in range(2)]
    large = torch.randn(1, 16, 16, generator=g)
    for q in small:
        rec.record("middle_block.1.attn2", q, k, 2, (4, 4), grid=(2, 2))
    rec.record("middle_block.1.attn2", large, k, 2, (4, 4), grid=(4, 4))
    assert rec.grids() == {"middle_block.1.attn2": [(2, 2), (4, 4)]}
    up = [
        F.interpolate(_naive_maps(q, k, 2, hw), size=(8, 8), mode="bilinear", align_corners=False)
        for q, hw in ((small[0], (2, 2)), (small[1], (2, 2)), (large, (4, 4)))
    ]
    got = rec.maps().per_layer["middle_block.1.attn2"]
    assert torch.allclose(got, sum(up) / 3, atol=1e-6)  # mean over the three calls
    assert torch.allclose(got.sum(1), torch.ones(1, 8, 8), atol=1e-5)  # still probabilities


def test_the_layers_own_grid_wins_and_a_grid_that_fits_nothing_is_skipped_with_one_warning():
    """Deep Shrink at factor 1.5 gives a 3x3 grid in an 8x8 latent (before the fix: ValueError
    '9 queries do not tile a 8x8 latent' raised inside the attention patch)."""
    from backdoor_seal.core.attention import layer_grid

    assert layer_grid(9, (3, 3), (8, 8)) == (3, 3)
    assert layer_grid(16, (3, 3), (8, 8)) == (4, 4)  # a stale activation shape falls back to the latent
    assert layer_grid(10, None, (8, 8)) is None
    rec = CrossAttentionRecorder(CaptureSettings(resolution=4))
    q, k = torch.randn(1, 9, 8), torch.randn(1, 77, 8)
    rec.record("a.attn2", q, k, 2, (8, 8), grid=(3, 3))
    assert rec.grids() == {"a.attn2": [(3, 3)]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            rec.record("a.attn2", torch.randn(1, 10, 8), k, 2, (8, 8))
    assert len(_capture_warnings(caught)) == 1  # once per recorder, not per call
    assert rec.maps().per_layer["a.attn2"].shape == (1, 77, 4, 4)


def test_larger_conditional_batches_fold_and_odd_shapes_are_left_out_with_a_warning():
    """Two positive conditionings in one call (cond_or_uncond [0, 0, 1]) fold onto the batch; a call
    with a token count other than the labels' is left out of the mean, with one warning."""
    g = torch.Generator().manual_seed(1)
    rec = CrossAttentionRecorder(CaptureSettings(resolution=4))
    rec.labels = [["x"] * 77]
    k1, k2 = torch.randn(1, 77, 8, generator=g), torch.randn(2, 77, 8, generator=g)
    q1, q2 = torch.randn(1, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    rec.record("a.attn2", q1, k1, 2, (4, 4))
    rec.record("a.attn2", q2, k2, 2, (4, 4))
    rec.record("a.attn2", q1, torch.randn(1, 50, 8, generator=g), 2, (4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = rec.maps().per_layer["a.attn2"]
    want = (_naive_maps(q1, k1, 2, (4, 4)) + _naive_maps(q2, k2, 2, (4, 4)).sum(0, keepdim=True)) / 3
    assert torch.allclose(got, want, atol=1e-6)
    assert len(_capture_warnings(caught)) == 1


def test_keys_padded_by_repetition_fold_back_onto_the_prompts_tokens():
    """ComfyUI pads a shorter prompt by repeating it (CONDCrossAttn.concat, comfy/conds.py): the maps
    of the repeated keys sum back to the prompt's own softmax, one column per label."""
    g = torch.Generator().manual_seed(2)
    rec = CrossAttentionRecorder(CaptureSettings(resolution=4))
    rec.labels = [["x"] * 77]
    q, k = torch.randn(1, 16, 8, generator=g), torch.randn(1, 77, 8, generator=g)
    rec.record("a.attn2", q, k.repeat(1, 2, 1), 2, (4, 4))
    assert torch.allclose(rec.maps().per_layer["a.attn2"], _naive_maps(q, k, 2, (4, 4)), atol=1e-6)


# --- the ComfyUI patch on synthetic calls ---------------------------------------------------------


def _options(**extra):
    return {"n_heads": 2, "original_shape": [2, 4, 4, 4], "activations_shape": [2, 8, 4, 4]} | extra


def test_patch_records_nothing_for_an_uncond_only_call_and_never_raises(comfy_root):
    """cond and uncond in separate model calls (before the fix: IndexError 'tensors used as indices
    must be long' at the first uncond-only call); a broken call costs one warning, never the output."""
    from comfy.ldm.modules.attention import optimized_attention

    from backdoor_seal.core.backends.comfy import ComfyCrossAttentionCapture

    rec = CrossAttentionRecorder(CaptureSettings(resolution=4))
    patch = ComfyCrossAttentionCapture(rec, "input_blocks.1.1.transformer_blocks.0.attn2")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 16, 8, generator=g) for _ in range(3))
    plain = optimized_attention(q, k, v, 2)
    assert torch.equal(patch(q, k, v, _options(cond_or_uncond=[1])), plain)
    assert rec.maps().per_layer == {}
    patch(q, k, v, _options(cond_or_uncond=[0]))
    assert rec.maps().per_layer["input_blocks.1.1.transformer_blocks.0.attn2"].shape == (2, 16, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        odd = torch.randn(3, 16, 8, generator=g)
        broken = [
            _options(cond_or_uncond=[0, 1]),  # 3 rows do not split into 2 chunks
            _options(cond_or_uncond=[0], sample_sigmas=[1.0, 0.0], sigmas=torch.ones(3)),  # no tensor
            _options(cond_or_uncond=[0], original_shape=None, activations_shape="nonsense"),
        ]
        for options in broken * 2:
            assert torch.equal(patch(odd, odd, odd, options), optimized_attention(odd, odd, odd, 2))
    got = _capture_warnings(caught)
    assert len(got) == 2  # one per kind of problem per recorder, however many calls hit it
    assert "ValueError" in got[0] and "fit neither the layer's grid" in got[1]


# --- another pack's attn2 patch (IPAdapter / InstantID / PuLID style) -------------------------------


class PackAttn2Replace:
    """A stand-in for cubiq/ComfyUI_IPAdapter_plus's `Attn2Replace` (CrossAttentionPatch.py) with its
    exact contract: `add(callback, **kwargs)` appends (and sets each kwarg as an attribute); a call
    computes `out = optimized_attention(q, k, v, n_heads)` and, for each callback whose
    sigma_end <= sigma <= sigma_start, `out = out + callback(out, q, k, v, extra_options, **kwargs)`;
    the result is cast back to q's dtype."""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        dtype = q.dtype
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = extra_options["sigmas"].detach().cpu()[0].item() if "sigmas" in extra_options else 999999999.9
        for i, callback in enumerate(self.callback):
            if sigma <= self.kwargs[i]["sigma_start"] and sigma >= self.kwargs[i]["sigma_end"]:
                out = out + callback(out, q, k, v, extra_options, **self.kwargs[i])
        return out.to(dtype=dtype)


def image_prompt_attention(out, q, k, v, extra_options, cond=None, weight=1.0, **kwargs):
    """Like IPAdapter's `ipadapter_attention`: attention of the queries to extra (image) tokens, scaled."""
    from comfy.ldm.modules.attention import optimized_attention

    extra = cond[..., : q.shape[-1]].expand(q.shape[0], -1, -1)
    return optimized_attention(q, extra, extra, extra_options["n_heads"]) * weight


def apply_pack(model, cond: torch.Tensor, sigma_start: float, sigma_end: float):
    """IPAdapterPlus.py's `set_model_patch_replace` on every cross-attention layer of a clone."""
    from backdoor_seal.core.attention import find_cross_attention_layers
    from backdoor_seal.core.backends.comfy import attn2_patch_key

    m = model.clone()
    kwargs = {"cond": cond, "weight": 0.7, "sigma_start": sigma_start, "sigma_end": sigma_end}
    for name, _ in find_cross_attention_layers(m.model.diffusion_model):
        key = attn2_patch_key(name)
        to = m.model_options["transformer_options"].copy()
        to["patches_replace"] = to.get("patches_replace", {}).copy()
        to["patches_replace"]["attn2"] = to["patches_replace"].get("attn2", {}).copy()
        if key not in to["patches_replace"]["attn2"]:
            to["patches_replace"]["attn2"][key] = PackAttn2Replace(image_prompt_attention, **kwargs)
            m.model_options["transformer_options"] = to
        else:
            to["patches_replace"]["attn2"][key].add(image_prompt_attention, **kwargs)
    return m


def _sample(model, positive, negative, latent_hw=(8, 8), steps=4, cfg=2.0, batch=1):
    import comfy.sample

    latent = torch.zeros(batch, 4, *latent_hw)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(
        model, noise, steps, cfg, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=0
    )


@pytest.fixture(scope="module")
def sd15(comfy_root):
    from backdoor_seal.core.backends.comfy_families import build_family

    model, clip, _vae = build_family("sd15")
    return model, clip


def _capture(model, clip, text: str, resolution: int = 8):
    from backdoor_seal.nodes.nodes_attention import SealAttentionCapture

    return SealAttentionCapture.execute(
        model=model, clip=clip, text=text, resolution=resolution, layers="", first_step=0, last_step=-1
    ).result


@pytest.mark.parametrize("order", ["capture_then_pack", "pack_then_capture"])
def test_an_ip_adapter_style_pack_works_in_either_order(sd15, order):
    """Before the fix, the pack after capture failed with AttributeError: 'ComfyCrossAttentionCapture'
    object has no attribute 'add'. Now both orders sample exactly what the pack alone samples, capture
    records every layer, and the pack's `.add` on a clone leaves the captured MODEL it came from alone."""
    from backdoor_seal.core.backends.comfy import text_conditioning

    model, clip = sd15
    prompt = "a red circle on the left"
    negative = text_conditioning(clip, "")
    ms = model.get_model_object("model_sampling")
    # the extra tokens act only on part of the run: the sigma window is honoured
    cond = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(5))
    window = (ms.percent_to_sigma(0.0), ms.percent_to_sigma(0.5))
    positive = text_conditioning(clip, prompt)
    pack_only = _sample(apply_pack(model, cond, *window), positive, negative)
    plain = _sample(model, positive, negative)
    assert (pack_only - plain).abs().max() > 1e-3  # the pack does change the output
    if order == "capture_then_pack":
        captured, positive, rec = _capture(model, clip, prompt)
        both = apply_pack(captured, cond, *window)
        assert torch.equal(_sample(captured, positive, negative), plain)  # the .add did not leak upstream
        rec.reset()
    else:
        captured, positive, rec = _capture(apply_pack(model, cond, *window), clip, prompt)
        both = captured
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _sample(both, positive, negative)
    assert not _capture_warnings(caught)
    assert (out - pack_only).abs().max() <= 1e-5
    maps = rec.maps()
    assert len(maps.per_layer) == 7 and maps.steps == [0, 1, 2, 3]
    assert torch.allclose(maps.combined().sum(1), torch.ones(1, 8, 8), atol=1e-4)


# --- stock ComfyUI nodes through the real sampler ----------------------------------------------------


def _deep_shrink(model, **kwargs):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    defaults = {
        "block_number": 3,
        "downscale_factor": 2.0,
        "start_percent": 0.0,
        "end_percent": 0.35,
        "downscale_after_skip": True,
        "downscale_method": "bicubic",
        "upscale_method": "bicubic",
    }
    return PatchModelAddDownscale.execute(model, **(defaults | kwargs)).result[0]


@pytest.mark.parametrize(
    ("factor", "small"),
    [(2.0, (4, 4)), (1.5, (5, 5))],  # 16x16 latent: the middle block runs at 8x8, shrunk to these
)
def test_deep_shrink_records_both_grids_of_the_shrunk_layers(sd15, factor, small):
    """Stock PatchModelAddDownscale (Kohya Deep Shrink) with its defaults, and with factor 1.5, then
    capture, then the stock sampler: no warning, the middle block seen at two grids, maps sum to 1."""
    from backdoor_seal.core.backends.comfy import text_conditioning

    model, clip = sd15
    captured, positive, rec = _capture(_deep_shrink(model, downscale_factor=factor), clip, "a blue square")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _sample(captured, positive, text_conditioning(clip, ""), latent_hw=(16, 16), steps=6)
        maps = rec.maps()
    assert not _capture_warnings(caught)
    assert torch.isfinite(out).all()
    grids = rec.grids()
    assert grids["middle_block.1.transformer_blocks.0.attn2"] == sorted([small, (8, 8)])
    assert grids["input_blocks.1.1.transformer_blocks.0.attn2"] == [(16, 16)]  # above the shrink: one grid
    assert len(maps.per_layer) == 7 and maps.steps == list(range(6))
    assert torch.allclose(maps.combined().sum(1), torch.ones(1, 8, 8), atol=1e-4)


def test_a_long_prompt_with_an_empty_negative_runs_in_separate_calls_and_labels_line_up(sd15):
    """A ~400-token positive and an empty negative differ by more than ComfyUI pads (6 chunks vs 1), so
    cond and uncond run in separate model calls: maps come from the cond calls only, one per label."""
    from backdoor_seal.core.backends.comfy import text_conditioning

    model, clip = sd15
    prompt = ", ".join(["a small red circle on the left of a large blue square"] * 33)
    captured, positive, rec = _capture(model, clip, prompt)
    calls: list[list[int]] = []

    def spy(apply_model, args):  # which chunks each model call carries
        calls.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    captured.set_model_unet_function_wrapper(spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sample(captured, positive, text_conditioning(clip, ""), steps=3)
    assert not _capture_warnings(caught)
    assert [0] in calls and [1] in calls  # separate cond and uncond calls happened
    maps = rec.maps()
    tokens = len(maps.labels[0])
    assert tokens == 77 * 6 and maps.combined().shape == (1, tokens, 8, 8)
    assert maps.labels[0][1] != "<EOS>" and maps.labels[0][77] == "<BOS>"  # chunk 2 starts with its own BOS
    assert torch.allclose(maps.combined().sum(1), torch.ones(1, 8, 8), atol=1e-4)


def test_a_short_prompt_padded_by_repetition_keeps_its_own_token_count(sd15):
    """A 1-chunk positive beside a 2-chunk negative runs in one call with the positive repeated to 154
    keys: the maps still have the prompt's 77 positions, and they sum to 1."""
    from backdoor_seal.core.backends.comfy import text_conditioning

    model, clip = sd15
    captured, positive, rec = _capture(model, clip, "a blue square")
    negative = text_conditioning(clip, ", ".join(["blurry, ugly, deformed, low quality"] * 12))
    _sample(captured, positive, negative, steps=2)
    maps = rec.maps()
    assert maps.combined().shape == (1, 77, 8, 8) and len(maps.labels[0]) == 77
    assert torch.allclose(maps.combined().sum(1), torch.ones(1, 8, 8), atol=1e-4)
