"""Full-size SD1.5 and SDXL random-weight single files (ComfyUI's own classes, fp16) through the CLI:
info, detect, unlearn (text and attn2-kv) and save; the saved file must differ from the input by exactly the
LoRA. Slow (SD1.5 about 15 minutes, SDXL about an hour on 2 CPU cores, 24 GB): `make test-slow`. The same
run as a benchmark that prints its figures: `backdoor-seal bench fullsize`."""

from __future__ import annotations

import argparse
import json

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_fullsize_checkpoint_goes_through_every_command_and_saves_input_plus_lora(family, tmp_path):
    from backdoor_seal.core.bench.fullsize import run

    args = argparse.Namespace(
        families=[family], scopes=["text", "attn2-kv"], steps=1, batch=1, latent_size=8,
        workdir=str(tmp_path), keep=False,
    )  # fmt: skip
    (record,) = run(args)
    print(json.dumps(record))  # the figures (peak RSS, s/step), also in the test log
    assert record["input"]["bytes"] > 2e9  # full size, fp16
    for command in ("info", "detect", "unlearn_text", "unlearn_attn2-kv"):
        assert record[command]["rc"] == 0, record[command].get("stderr_tail")
        assert record[command]["peak_rss_gib"] > 1.0
    for scope in ("text", "attn2-kv"):
        run_ = record[f"unlearn_{scope}"]
        assert run_["seconds_per_step"] > 0
        check = run_["check"]
        assert check["changed_by_lora"] > 0
        assert check["changed_weights_match"] and check["every_other_weight_bit_identical"], check
