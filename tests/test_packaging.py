"""The pack's metadata, dependency lists and import hygiene."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import architecture
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
# Modules a ComfyUI installation provides; only the ComfyUI backend and the node files import them.
COMFY_PROVIDED = architecture.COMFY_MODULES


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
    skip = {".venv", ".comfyui", ".comfyui-0.8.0", ".cache", "out", "build"}
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


def _declared() -> set[str]:
    """Every distribution the pack declares: its dependencies and its optional extras, normalised."""
    project = _pyproject()["project"]
    names = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        names += extra
    return {re.split(r"[<>=!~\[ ;]", n, maxsplit=1)[0].lower().replace("_", "-") for n in names}


def test_every_imported_third_party_module_is_declared():
    """Each module the pack imports comes with the Python standard library, ComfyUI, or a declared distribution."""
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for folder in ("core", "nodes"):
        for path in architecture.python_files(ROOT, folder):
            for line, module in architecture.third_party_imports(path):
                if module in sys.stdlib_module_names or module == "backdoor_seal" or module in COMFY_PROVIDED:
                    continue
                # an optional extra that is not installed here (xformers) is known by its own name
                dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
                if not dists & declared:
                    missing.append(f"{path.relative_to(ROOT)}:{line}: {module} ({', '.join(dists) or '?'})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The pack built as a wheel from a copy of its files and installed into a fresh virtual environment
    (its dependencies visible through a .pth to this environment's site-packages, the pack itself not)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    skip = shutil.ignore_patterns(
        ".git", ".venv", ".comfyui", ".comfyui-0.8.0", ".cache", "out", "build", "*.egg-info", "__pycache__"
    )
    shutil.copytree(ROOT, source, ignore=skip)
    dist = tmp / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    env = tmp / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    here = [p for p in sys.path if p.endswith("site-packages")]
    (Path(site) / "seal_test_dependencies.pth").write_text("\n".join(here) + "\n")
    wheel = next(dist.glob("backdoor_seal-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return env


def test_the_wheel_holds_every_package_and_the_data(installed_wheel):
    import zipfile

    wheel = next((installed_wheel.parent / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {
        "backdoor_seal/" + str(p.parent.relative_to(ROOT)) + "/__init__.py"
        for folder in ("core", "nodes")
        for p in (ROOT / folder).rglob("__init__.py")
    }
    assert packages <= names, packages - names
    modules = {
        "backdoor_seal/" + str(p.relative_to(ROOT))
        for f in ("core", "nodes")
        for p in architecture.python_files(ROOT, f)
    }
    assert modules <= names, modules - names
    assert {"backdoor_seal/web/js/seal_report.js", "backdoor_seal/lab_models/lab-pixel.safetensors"} <= names
    assert "backdoor_seal/setup.py" not in names


def test_every_command_runs_from_the_installed_wheel(installed_wheel):
    """`backdoor-seal <command> --help` for every command, from the wheel alone (not this checkout): the
    console script once, then every command path in one process of the fresh environment."""
    script = installed_wheel / "bin" / "backdoor-seal"
    top = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd="/", timeout=120)
    assert top.returncode == 0 and "usage: backdoor-seal" in top.stdout, top.stderr
    code = """
import contextlib, io, json, sys
import backdoor_seal
from backdoor_seal.core.cli import build_parser, main
import argparse

def paths(parser):
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = paths(sub)
                out += [[name, *n] for n in nested] if nested else [[name]]
    return out

results = {}
for command in paths(build_parser()):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            main([*command, "--help"])
            code = None
        except SystemExit as e:
            code = e.code
    results[" ".join(command)] = [code, text.getvalue().startswith("usage: backdoor-seal")]
print(json.dumps({"file": backdoor_seal.__file__, "version": backdoor_seal.__version__, "help": results}))
"""
    out = subprocess.run(
        [str(installed_wheel / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.splitlines()[-1])
    assert Path(found["file"]).is_relative_to(installed_wheel) and found["version"] == _pyproject_version()
    commands = found["help"]
    assert {"detect", "scan", "unlearn", "sau", "evaluate", "info", "demo", "lab train", "bench sau"} <= set(
        commands
    )
    assert all(v == [0, True] for v in commands.values()), commands


def _pyproject_version() -> str:
    from backdoor_seal.core.version import __version__

    return __version__


def test_the_pack_root_imports_nothing_at_module_level():
    """pytest loads the root __init__.py on its own when the checkout's folder is no identifier
    (`git clone .../backdoor-seal`): a module-level relative import there breaks every test."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    assert not [
        n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom) and n.module != "__future__"
    ]
