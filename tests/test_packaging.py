"""The pack's metadata, dependency lists and import hygiene."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_requirements_match_pyproject_dependencies():
    assert _requirements() == _pyproject()["project"]["dependencies"]


def test_torch_unpinned_and_xformers_optional():
    proj = _pyproject()["project"]
    assert "torch" in proj["dependencies"]
    assert not any(d.startswith("xformers") for d in proj["dependencies"])
    assert proj["optional-dependencies"]["xformers"] == ["xformers"]
    assert "dev" in proj["optional-dependencies"]
    assert proj["scripts"]["backdoor-seal"] == "backdoor_seal.core.cli:main"


def test_comfy_registry_metadata():
    comfy = _pyproject()["tool"]["comfy"]
    assert comfy["DisplayName"] == "Backdoor Seal"
    assert comfy["PublisherId"] and comfy["Icon"]
    assert comfy["requires-comfyui"] == ">=0.3.75"
    assert _pyproject()["project"]["name"] == "backdoor-seal"


def _python_sources() -> list[Path]:
    skip = {".venv", ".comfyui", ".cache", "out", "build"}
    return [p for p in ROOT.rglob("*.py") if not skip.intersection(p.relative_to(ROOT).parts)]


def test_no_absolute_import_of_our_nodes_package():
    """ComfyUI owns the top-level module `nodes`: ours is only imported relatively."""
    offenders = []
    for path in _python_sources():
        if path.parent.name == "tests":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").split(".")[0] == "nodes"
            ):
                offenders.append(str(path))
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "nodes" for a in node.names):
                offenders.append(str(path))
    assert offenders == []


def test_only_the_comfy_backend_imports_comfy_in_core():
    offenders = []
    for path in (ROOT / "core").rglob("*.py"):
        if path.name.startswith("comfy") and path.parent.name == "backends":
            continue  # the ComfyUI backend: comfy.py, comfy_train.py
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            )
            if any(n.split(".")[0] in {"comfy", "comfy_api", "folder_paths", "nodes"} for n in names):
                offenders.append(str(path))
    assert offenders == []


def test_package_imports_without_comfyui():
    """Headless use: importing the engine must not pull in ComfyUI."""
    code = (
        "import sys, backdoor_seal, backdoor_seal.core.cli, backdoor_seal.core.attention; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'nodes', 'folder_paths')]; "
        "assert not bad, bad; print(backdoor_seal.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (ROOT / "__init__.py").resolve()


def test_lint_bans_exec_eval_and_unpickling(tmp_path):
    """The Comfy registry rejects exec/eval; we also ban unpickling. The lint config must catch all three."""
    bad = tmp_path / "bad.py"
    bad.write_text('import torch\n\nx = torch.load("a")\ny = eval("1")\nexec("2")\n')
    ruff = Path(sys.executable).parent / "ruff"
    out = subprocess.run(
        [
            str(ruff),
            "check",
            "--no-cache",
            "--config",
            str(ROOT / "pyproject.toml"),
            "--output-format",
            "concise",
            str(bad),
        ],
        capture_output=True,
        text=True,
    )
    for code in ("TID251", "S307", "S102"):
        assert code in out.stdout, out.stdout
