"""Integration (#20): tiny instances of ComfyUI's real SD15 / SD20 (v-prediction) / SDXL classes through every
node of the pack that takes a MODEL or CLIP, on a real ComfyUI server: one graph per family (tests/graphs.py
`family_graph`), then the saved files checked and reloaded in this process.

The server builds the model with SealLabFamilyModel (random weights, fixed seed); this process builds the same
one with `comfy_families.build_family` to compare the saved checkpoint against it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from graphs import FAMILY_SCOPES, family_graph, profile_reload_graph
from hosts import HOSTS

pytestmark = pytest.mark.server

PREDICTION = {"sd15": "eps", "sd20": "v", "sdxl": "eps"}
UNET_FAMILY = {"sd15": "SD15", "sd20": "SD20", "sdxl": "SDXL"}
ARCHITECTURE = {
    "sd15": "stable-diffusion-v1",
    "sd20": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
SEED = 3
PNG = b"\x89PNG\r\n\x1a\n"

# Nodes no family graph can exercise, and why (every other node id must appear in a server-run graph).
NOT_IN_FAMILY_GRAPHS = {
    "SealLabCheckpointLoader": "loads lab models only (run by tests/test_server.py and the workflows)",
    # its first stage puts all 49,408 CLIP tokens in front of a probe whatever the settings: minutes on a
    # CPU for any family; run on lab models by tests/test_nodes_detect.py
    "SealScanModel": "scans the whole vocabulary (minutes on a CPU); tested on lab models in-process",
    # the family graph runs the same comparison through SealCompareModels on its unlearned copy
    "SealCompareLora": "needs a LoRA of the family in the loras folder; queued on a lab LoRA by test_workflows",
}


# every family on the default host; on the second, one graph through every node (SD1.5)
RUNS = [(HOSTS[0], f) for f in ("sd15", "sd20", "sdxl")] + [(HOSTS[1], "sd15")]


@pytest.fixture(scope="module", params=RUNS, ids=lambda r: f"{r[1]}-{r[0]}")
def family_run(request):
    """(family, the family graph's /history entry, the profile-reload graph's entry, client, output folder)."""
    host, family = request.param
    server = request.getfixturevalue("comfy_server" if host == HOSTS[0] else "second_host_server")
    client = server.client()
    profile = f"families-{family}"
    entry = client.run(family_graph(family, PREDICTION[family], SEED, profile_name=profile), timeout=600)
    # the saved SAU profile comes back through SealLoadSAUProfile and samples the same family's model
    reload_graph = profile_reload_graph(family, PREDICTION[family], SEED, f"{profile}.safetensors")
    reloaded = client.run(reload_graph, timeout=300)
    return family, entry, reloaded, client, Path(server.output_dir)


def _pngs(client, images) -> list:
    from PIL import Image

    out = []
    for image in images:
        data = client.fetch_image(image)
        assert data[:8] == PNG
        out.append(Image.open(io.BytesIO(data)))
    return out


def test_model_info_names_the_family_and_prediction(family_run):
    family, entry, _, _, _ = family_run
    info = json.loads(entry["outputs"]["2"]["text"][0])
    assert info["unet_family"] == UNET_FAMILY[family]
    assert info["model_class"] == ("SDXL" if family == "sdxl" else "BaseModel")
    assert info["prediction"] == ("V_PREDICTION" if PREDICTION[family] == "v" else "EPS")
    assert info["cross_attention_layers"] > 0
    encoders = {e["name"] for e in info["text_encoders"]}
    assert encoders == {"sd15": {"clip_l"}, "sd20": {"clip_h"}, "sdxl": {"clip_l", "clip_g"}}[family]


def test_capture_heatmaps_and_detection_give_pngs_and_reports(family_run):
    family, entry, _, client, _ = family_run
    out = entry["outputs"]
    (grid,) = _pngs(client, out["8"]["images"])  # the heatmap grid: the image and the token overlays
    assert grid.size[0] >= 3 * grid.size[1] // 2
    charts = _pngs(client, out["10"]["images"])
    assert len(charts) == 2  # one per-token chart per checked prompt
    verdicts = out["9"]["text"][0].splitlines()
    checked = ("cf a red cat on the left", "a blue dog in a garden")
    assert len(verdicts) == 2, verdicts  # one verdict per checked prompt, naming it
    assert all(
        v.startswith(("TRIGGERED", "clean")) and p in v for v, p in zip(verdicts, checked, strict=True)
    )


def test_the_comparison_names_the_unlearned_copys_cross_attention_change(family_run):
    _, entry, _, client, _ = family_run
    out = entry["outputs"]
    summary = out["50"]["text"][0]
    assert summary.startswith("weight space only: ranked, not judged") and "cross_attention_kv:" in summary
    assert "text_encoder" not in summary  # the attn2-kv scope changed the UNet's keys and values only
    (chart,) = _pngs(client, out["51"]["images"])
    assert chart.size[0] > 100
    sanitize = out["52"]["seal_report"][0]  # told no trigger: its candidate measured before (and after)
    assert sanitize["kind"] == "sanitize" and sanitize["mode"] == "compare"
    assert len(sanitize["candidates"]) == 1 and sanitize["candidates"][0]["before"] is not None
    (firing,) = _pngs(client, out["53"]["images"])
    assert firing.size[0] > 100


@pytest.mark.parametrize("scope", FAMILY_SCOPES)
def test_saved_checkpoint_and_lora_are_right(family_run, scope):
    """fp16 tensors, modelspec metadata (v-prediction marker for SD2-v), a kohya LoRA with the family's key
    prefixes; the checkpoint reloads through ComfyUI's loader as the built model plus exactly that LoRA."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    from safetensors import safe_open

    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.backends.comfy_checkpoint import load_single_file_checkpoint
    from backdoor_seal.core.unlearn.save import PROVENANCE_KEY

    family, entry, _, _, output = family_run
    k = FAMILY_SCOPES.index(scope)
    saved = entry["outputs"][str(21 + 2 * k)]["text"][0].splitlines()
    assert len(saved) == 2
    checkpoint, lora_path = (output / p for p in saved)
    assert checkpoint.is_file() and lora_path.is_file() and "_lora" in lora_path.name
    v = PREDICTION[family] == "v"

    with safe_open(str(checkpoint), framework="pt") as f:
        stored = {key: f.get_slice(key).get_dtype() for key in f.keys()}
        meta = f.metadata()
    weights = {
        d for key, d in stored.items() if key.startswith(("model.", "cond_stage", "conditioner", "first_"))
    }
    assert weights <= {"F16", "I64"} and "F16" in weights
    assert meta["modelspec.architecture"] == ARCHITECTURE[family]
    assert meta["modelspec.predict_key"] == ("v" if v else "epsilon")
    assert ("v_pred" in stored) == v
    assert json.loads(meta[PROVENANCE_KEY])["steps_run"] == 2

    with safe_open(str(lora_path), framework="pt") as f:
        kohya = {key: f.get_tensor(key) for key in f.keys()}
        lora_meta = f.metadata()
    prefixes = {
        key.split("_text_model")[0] if key.startswith("lora_te") else key.split("_", 2)[1] for key in kohya
    }
    want = {"sd15": {"lora_te"}, "sd20": {"lora_te"}, "sdxl": {"lora_te1", "lora_te2"}}[family]
    assert prefixes == (want if scope == "text" else {"unet"})
    if scope == "attn2-kv":
        assert all("_attn2_to_k." in key or "_attn2_to_v." in key for key in kohya)
    ups = [t for key, t in kohya.items() if key.endswith("lora_up.weight")]
    assert ups and any(t.abs().max() > 0 for t in ups)  # it trained
    assert lora_meta["ss_network_module"] == "networks.lora"
    assert lora_meta["modelspec.predict_key"] == ("v" if v else "epsilon")

    # the built model, the built model + the saved LoRA through ComfyUI's LoRA loader, and the reloaded file
    model, clip, _ = comfy_families.build_family(family, "tiny", PREDICTION[family], SEED)

    def loaded_weights(m, c) -> dict[str, torch.Tensor]:
        mm.load_models_gpu([m, c.load_model()], force_patch_weights=True)
        sd = {
            key: t.float().clone()
            for key, t in m.model.state_dict().items()
            if key.startswith("diffusion_model.")
        }
        return sd | {key: t.float().clone() for key, t in c.cond_stage_model.state_dict().items()}

    built = loaded_weights(model, clip)
    patched_model, patched_clip = comfy.sd.load_lora_for_models(
        model, clip, comfy.utils.load_torch_file(str(lora_path)), 1.0, 1.0
    )
    patched = loaded_weights(patched_model, patched_clip)
    with comfy_families.tiny_detection():
        re_model, re_clip, _ = load_single_file_checkpoint(
            checkpoint, te_model_options=comfy_families.text_options("tiny"), output_vae=False
        )
    assert re_model.model.model_type.name == ("V_PREDICTION" if v else "EPS")
    reloaded = loaded_weights(re_model, re_clip)
    mm.unload_all_models()

    skipped = {"clip_l.transformer.text_projection.weight"}  # no file holds it (unset and unused in ComfyUI)
    assert built.keys() - skipped == reloaded.keys() - skipped
    trained = {key for key in built if key not in skipped and not torch.equal(built[key], patched[key])}
    assert trained, "the LoRA changes no weight"
    if scope == "text":
        assert all(key.startswith("clip_") for key in trained)
        if family == "sdxl":
            assert {key.split(".")[0] for key in trained} == {"clip_l", "clip_g"}
    else:
        assert all(".attn2.to_k." in key or ".attn2.to_v." in key for key in trained)
    for key in built.keys() - skipped:
        if key in trained:
            assert torch.allclose(reloaded[key], patched[key].half().float(), rtol=1e-3, atol=1e-4), key
            assert not torch.equal(reloaded[key], built[key].half().float()), key
        else:  # the fp16 file's value; or the built one where ComfyUI keeps its own (CLIP's logit_scale)
            assert torch.equal(reloaded[key], built[key].half().float()) or torch.equal(
                reloaded[key], built[key]
            ), key


def test_sau_and_evaluation_run_on_the_family(family_run):
    family, entry, reloaded, client, output = family_run
    out = entry["outputs"]
    assert len(_pngs(client, out["33"]["images"])) == 1  # SealSAUSampler -> SealSAUDecode
    assert (output / "backdoor_seal" / "sau" / f"families-{family}.safetensors").is_file()
    assert len(_pngs(client, reloaded["outputs"]["7"]["images"])) == 1  # the profile, loaded back
    report = out["40"]["seal_report"][0]
    assert report["prompts"] == 2 and report["trigger"] == "cf"
    assert 0.0 <= report["asr_before"] <= 1.0 and 0.0 <= report["asr_after"] <= 1.0
    assert -1.0 <= report["clean_fidelity_ssim"] <= 1.0
    assert len(_pngs(client, out["42"]["images"])) == 1  # the evaluation figure


def test_every_node_runs_in_a_server_test(comfy_root):
    """A node id of ours must appear in a family graph, in a graph tests/test_server.py queues, or in an
    example workflow tests/test_workflows.py queues, or be listed with a reason in NOT_IN_FAMILY_GRAPHS."""
    import graphs

    from backdoor_seal.core.demo import attention_graph, unlearn_graph
    from backdoor_seal.nodes import NODES

    ours = {n.define_schema().node_id for n in NODES}
    run = [
        family_graph("sd15"),
        graphs.model_info_graph("m"),
        graphs.detect_graph("m", ["p"]),
        graphs.lora_graph("m", "l", "p"),
        attention_graph("m", "p"),
        unlearn_graph("m", "t", "p"),
        profile_reload_graph("sd15", "eps", 0, "p.safetensors"),
    ]
    root = Path(__file__).resolve().parent / "workflows"
    run += [json.loads(p.read_text()) for p in sorted(root.glob("*.api.json"))]
    queued = {node["class_type"] for graph in run for node in graph.values()}
    in_family = {node["class_type"] for node in family_graph("sd15").values()}
    assert not (set(NOT_IN_FAMILY_GRAPHS) & in_family), "an exception that a family graph now runs"
    assert ours - queued - set(NOT_IN_FAMILY_GRAPHS) == set()
    takes_model = {
        n.define_schema().node_id
        for n in NODES
        if any(i.get_io_type() in {"MODEL", "CLIP"} for i in n.define_schema().inputs)
    }
    assert (
        takes_model and takes_model - set(NOT_IN_FAMILY_GRAPHS) <= in_family
    )  # every MODEL / CLIP node runs on every family
