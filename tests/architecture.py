"""The layout's rules as data, and the scans that check them.

tests/test_architecture.py asserts that the scans find nothing; `python tests/architecture.py [ROOT]`
prints the figures (lines per folder, imports against the layers, ComfyUI internals reached outside
core/backends/) as JSON, for any checkout.
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The parts of core/ from the bottom up. A module may import its own part and any part of a lower
# layer; in the jobs' layers, parts side by side (unlearn and sau) never import each other.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    # capture and the small helpers every part uses (tokens, triggers, images, files, figures)
    (
        "ground",
        frozenset(
            {
                "attention",
                "tokens",
                "triggers",
                "images",
                "safetensors_io",
                "cache",
                "plots",
                "heatmaps",
                "version",
                "comfy_host",
                "workflows",
            }
        ),
    ),
    ("backends", frozenset({"backends"})),  # the only code that touches a runtime's objects
    ("lab", frozenset({"lab"})),  # the toy world, its models and attacks
    ("shared", frozenset({"prompts", "models"})),  # prompt sets and model specs, lab ones included
    # the jobs, in the order data flows: capture -> detect -> unlearn / SAU -> evaluate
    ("detect", frozenset({"detect"})),  # find: in a prompt, in the vocabulary
    ("compare", frozenset({"diff"})),  # find against the base: builds on detect's probes and statistics
    ("remove", frozenset({"unlearn", "sau"})),
    ("evaluate", frozenset({"evaluate"})),
    ("sanitize", frozenset({"sanitize"})),  # find -> choose -> unlearn -> verify: every job above, chained
    ("top", frozenset({"bench", "cli", "demo"})),  # commands, benchmarks and the demo use everything
)
# Layers whose parts may import each other (single-file helpers; the commands).
OPEN_LAYERS = frozenset({"ground", "top"})

# Attributes of ComfyUI's MODEL / CLIP / VAE / CLIP_VISION objects (and of the modules they hold):
# only core/backends/ may name them. A name reached through getattr("...") counts too.
COMFY_INTERNALS = frozenset(
    {
        "add_patches",
        "add_weight_wrapper",
        "apply_model",
        "clip_g",
        "clip_h",
        "clip_l",
        "cond_stage_model",
        "diffusion_model",
        "encode_from_tokens",
        "encode_from_tokens_scheduled",
        "encode_image",
        "end_token",
        "first_stage_model",
        "get_sd",
        "latent_format",
        "load_model",
        "model_config",
        "model_options",
        "model_sampling",
        "patcher",
        "post_quant_conv",
        "quant_conv",
        "set_model_attn2_output_patch",
        "set_model_attn2_patch",
        "set_model_attn2_replace",
        "start_token",
        "state_dict_for_saving",
        "tokenize",
        "weight_wrapper_patches",
    }
)
# Modules of a ComfyUI installation: only core/backends/comfy*.py and the node files import them.
COMFY_MODULES = frozenset(
    {
        "comfy",
        "comfy_api",
        "comfy_extras",
        "folder_paths",
        "latent_preview",
        "node_helpers",
        "nodes",
        "server",
    }
)


@dataclass(frozen=True)
class Finding:
    """One place that breaks a rule."""

    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def python_files(root: Path, folder: str) -> list[Path]:
    """The .py files under root/folder."""
    return sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def layer_of(part: str) -> int | None:
    """The layer index of a part of core/ (None for a part no layer names)."""
    for index, (_, parts) in enumerate(LAYERS):
        if part in parts:
            return index
    return None


def _resolve(path: Path, root: Path, node: ast.ImportFrom) -> list[str]:
    """Module paths (relative to root, dotted) an ImportFrom names; absolute imports of the pack too."""
    if node.level == 0:
        module = node.module or ""
        if module.split(".")[0] != "backdoor_seal":
            return []
        base = module.split(".")[1:]
    else:
        package = list(path.relative_to(root).parent.parts)  # a module's package, or __init__'s own
        base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    return [".".join([*base, a.name]) for a in node.names]  # a name is a module, or an attribute of base


def imports_of(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module path relative to the pack root) of every import of the pack's own modules."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            seen = set()
            for target in _resolve(path, root, node):
                parts = target.split(".")
                # the longest prefix that is a module or package of the pack
                for k in range(len(parts), 0, -1):
                    candidate = root.joinpath(*parts[:k])
                    if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
                        key = ".".join(parts[:k])
                        if key not in seen:
                            seen.add(key)
                            yield node.lineno, key
                        break
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "backdoor_seal":
                    yield node.lineno, ".".join(a.name.split(".")[1:])


def third_party_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level module) of every absolute import that is not the pack's own."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def _part(module: str) -> str | None:
    """The part of core/ a dotted module path belongs to (core.detect.scan -> detect)."""
    parts = module.split(".")
    if parts[0] != "core" or len(parts) < 2:
        return None
    return parts[1]


def layer_violations(root: Path = ROOT) -> list[Finding]:
    """Imports inside core/ that go up the layers, sideways between jobs, or into the node files."""
    out = []
    for path in python_files(root, "core"):
        rel = path.relative_to(root)
        own = _part(".".join(rel.with_suffix("").parts))
        if own is None or own == "__init__":
            continue
        own_layer = layer_of(own)
        if own_layer is None:
            out.append(Finding(str(rel), 1, f"core/{own} belongs to no layer (add it to LAYERS)"))
            continue
        for line, target in imports_of(path, root):
            if target.split(".")[0] == "nodes":
                out.append(Finding(str(rel), line, f"the engine imports the node files ({target})"))
                continue
            part = _part(target)
            if part is None or part == own or part == "__init__":
                continue
            layer = layer_of(part)
            if layer is None:
                continue
            name = LAYERS[own_layer][0]
            if layer < own_layer or (layer == own_layer and name in OPEN_LAYERS):
                continue
            out.append(Finding(str(rel), line, f"{own} ({name}) imports {target} ({LAYERS[layer][0]})"))
    return out


def backend_violations(root: Path = ROOT) -> list[Finding]:
    """Backend modules that import anything above the ground: the lab, the shared prompt sets and specs, a job."""
    out = []
    for path in python_files(root, "core/backends"):
        rel = path.relative_to(root)
        for line, target in imports_of(path, root):
            layer = layer_of(_part(target) or "")
            if layer is not None and layer > layer_of("backends"):
                out.append(Finding(str(rel), line, f"a backend imports {target}"))
    return out


def node_violations(root: Path = ROOT) -> list[Finding]:
    """Node files that import each other, the lab (but the lab's own node file), or a command module."""
    out = []
    for path in python_files(root, "nodes"):
        rel = path.relative_to(root)
        for line, target in imports_of(path, root):
            parts = target.split(".")
            if parts[0] == "nodes" and len(parts) > 1 and parts[1].startswith("nodes_"):
                if path.name != "__init__.py":
                    out.append(Finding(str(rel), line, f"a node file imports another ({target})"))
            elif _part(target) == "lab" and path.name != "nodes_lab.py":
                out.append(Finding(str(rel), line, f"a node file imports the lab ({target})"))
            elif _part(target) in {"cli", "bench", "demo"} or parts[-1] == "cli":
                out.append(Finding(str(rel), line, f"a node file imports a command ({target})"))
    return out


def unannotated_node_parameters(root: Path = ROOT) -> list[Finding]:
    """execute() parameters of node classes that carry no type."""
    out = []
    for path in python_files(root, "nodes"):
        rel = path.relative_to(root)
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef) and node.name == "execute":
                args = node.args.args[1:] + node.args.kwonlyargs  # the first is cls
                out += [
                    Finding(str(rel), node.lineno, f"execute({a.arg}) has no type")
                    for a in args
                    if a.annotation is None
                ]
    return out


# A VAE's own methods: decoding and encoding go through core/backends (comfy_vae), like every other reach.
VAE_METHODS = frozenset({"decode", "encode", "decode_tiled", "encode_tiled"})


def internal_reaches(root: Path = ROOT) -> list[Finding]:
    """Attribute reaches into ComfyUI objects outside core/backends/ (core and nodes), a VAE's decode and
    encode calls included."""
    out = []
    for folder in ("core", "nodes"):
        for path in python_files(root, folder):
            rel = path.relative_to(root)
            if rel.parts[:2] == ("core", "backends"):
                continue
            for node in ast.walk(_tree(path)):
                name = None
                if isinstance(node, ast.Attribute) and node.attr in COMFY_INTERNALS:
                    name = node.attr
                elif (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr", "setattr")
                    and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in COMFY_INTERNALS
                ):
                    name = f"{node.func.id}(..., {node.args[1].value!r})"
                elif (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in VAE_METHODS
                    and "vae" in ast.unparse(node.func.value).lower()
                ):
                    name = f"{node.func.attr}() of a VAE (core.backends.comfy.vae_decode)"
                if name:
                    out.append(Finding(str(rel), node.lineno, f"reaches .{name} of a ComfyUI object"))
    return out


def comfy_import_violations(root: Path = ROOT) -> list[Finding]:
    """Modules of core/ outside the ComfyUI backends that import a ComfyUI module."""
    out = []
    for path in python_files(root, "core"):
        rel = path.relative_to(root)
        if rel.parts[:2] == ("core", "backends") and path.name.startswith("comfy"):
            continue
        for line, module in third_party_imports(path):
            if module in COMFY_MODULES:
                out.append(Finding(str(rel), line, f"imports ComfyUI's {module}"))
    return out


def lines_per_folder(root: Path = ROOT) -> dict[str, int]:
    """Lines of Python per folder of the pack (core's parts one by one)."""
    out: dict[str, int] = {}
    for path in python_files(root, "."):
        rel = path.relative_to(root)
        if rel.parts[0] in {".venv", ".comfyui", ".comfyui-0.8.0", ".cache", "out", "build"}:
            continue
        key = "/".join(rel.parts[:2]) if rel.parts[0] == "core" and len(rel.parts) > 2 else rel.parts[0]
        if rel.parts[0] == "core" and len(rel.parts) == 2:
            key = "core (ground)"
        if len(rel.parts) == 1:
            key = "(root)"
        out[key] = out.get(key, 0) + len(path.read_text(encoding="utf-8").splitlines())
    return dict(sorted(out.items()))


def figures(root: Path = ROOT) -> dict:
    """Everything the rules count, for a closing note or a before/after comparison."""
    checks = {
        "layer_violations": layer_violations(root),
        "backend_violations": backend_violations(root),
        "node_violations": node_violations(root),
        "internal_reaches": internal_reaches(root),
        "comfy_import_violations": comfy_import_violations(root),
        "unannotated_node_parameters": unannotated_node_parameters(root),
    }
    return {
        "lines_per_folder": lines_per_folder(root),
        **{k: len(v) for k, v in checks.items()},
        "details": {k: [str(f) for f in v] for k, v in checks.items()},
    }


if __name__ == "__main__":
    print(json.dumps(figures(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT), indent=1))
