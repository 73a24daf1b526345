"""The layout's rules (tests/architecture.py holds them as data): each test fails on the first breach.

docs/architecture.md says which rule each test keeps true.
"""

from __future__ import annotations

import architecture as arch


def _none(findings: list) -> None:
    assert not findings, "\n" + "\n".join(map(str, findings))


def test_only_the_backends_reach_into_comfyui_objects():
    """Attributes of MODEL / CLIP / VAE internals are named only in core/backends/ (point 1)."""
    _none(arch.internal_reaches())


def test_only_the_comfyui_backend_imports_comfyui():
    _none(arch.comfy_import_violations())


def test_backends_import_no_job_and_no_lab():
    """A backend serves the jobs and the lab; it imports neither (point 1)."""
    _none(arch.backend_violations())


def test_imports_follow_the_layers_and_the_flow():
    """Shared ground below the jobs; detect -> unlearn / sau -> evaluate, never back or sideways (point 2)."""
    _none(arch.layer_violations())


def test_every_part_of_core_has_a_layer():
    parts = {p.name.removesuffix(".py") for p in (arch.ROOT / "core").iterdir()}
    parts -= {"__init__", "__pycache__"}
    assert parts <= {part for _, layer in arch.LAYERS for part in layer}, parts


def test_node_files_stand_side_by_side():
    """No nodes_*.py imports another; only the lab loader imports the lab; no node imports a command (point 3)."""
    _none(arch.node_violations())


def test_node_execute_parameters_are_typed():
    _none(arch.unannotated_node_parameters())


def test_the_scans_see_what_they_look_for(tmp_path):
    """Each scan reports a planted breach (so a green run means the rules hold, not that nothing was read)."""
    (tmp_path / "core" / "detect").mkdir(parents=True)
    (tmp_path / "core" / "unlearn").mkdir()
    (tmp_path / "core" / "backends").mkdir()
    (tmp_path / "nodes").mkdir()
    for folder in ("core", "core/detect", "core/unlearn", "core/backends", "nodes"):
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "core" / "unlearn" / "session.py").write_text("X = 1\n")
    (tmp_path / "core" / "detect" / "cli.py").write_text(
        "from ..unlearn.session import X\n\ndef f(model, vae, z):\n    vae.decode(z)\n    return model.model.diffusion_model\n"
    )
    (tmp_path / "core" / "backends" / "comfy.py").write_text("from ..detect import cli\n")
    (tmp_path / "nodes" / "nodes_a.py").write_text("X = 1\n")
    (tmp_path / "nodes" / "nodes_b.py").write_text(
        "from .nodes_a import X\n\nclass N:\n    def execute(cls, clip):\n        return getattr(clip, 'cond_stage_model')\n"
    )
    assert {f.what for f in arch.layer_violations(tmp_path)} == {
        "detect (detect) imports core.unlearn.session (remove)",
        "backends (backends) imports core.detect.cli (detect)",
    }
    assert len(arch.backend_violations(tmp_path)) == 1
    assert len(arch.node_violations(tmp_path)) == 1
    assert len(arch.unannotated_node_parameters(tmp_path)) == 1
    reaches = sorted(f.what for f in arch.internal_reaches(tmp_path))
    assert len(reaches) == 3 and any("cond_stage_model" in r for r in reaches)  # and diffusion_model
    assert any("decode() of a VAE" in r for r in reaches)
