"""ComfyUI workflow formats: the UI format people share (nodes, links, widget values) and the API format
/prompt executes, converted both ways with /object_info, as the frontend converts them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only nodes


def _specs(info: dict[str, Any]) -> Iterator[tuple[str, list]]:
    """(name, spec) of every input of a node type, in the order the frontend lays them out."""
    inputs = info.get("input", {})
    order = info.get("input_order", {})
    for group in ("required", "optional"):
        specs = inputs.get(group, {})
        for name in order.get(group, list(specs)):
            yield name, specs[name]


def is_widget(spec: list) -> bool:
    """Whether an input is a widget (typed in the node) rather than a socket."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def _control(name: str, spec: list) -> bool:
    """Whether the frontend puts a "control after generate" widget after this one: flagged INTs, and
    INTs named seed or noise_seed unless flagged off."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    flag = options.get("control_after_generate")
    return spec[0] == "INT" and (bool(flag) if flag is not None else name in ("seed", "noise_seed"))


def _default(spec: list) -> Any:
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    if kind == "COMBO":
        return (options.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def _socket_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else str(spec[0])


def api_from_ui(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The API-format prompt the frontend would queue for a UI-format workflow."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode", 0) != 0:
            continue
        if kind not in object_info:
            raise KeyError(f"node type {kind!r} (node {node['id']}) is not installed in this ComfyUI")
        values = iter(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for name, spec in _specs(object_info[kind]):
            if is_widget(spec):
                inputs[name] = next(values)
                if _control(name, spec):
                    next(values)  # the "control after generate" mode the frontend keeps beside the value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def _depths(prompt: dict[str, Any]) -> dict[str, int]:
    """Each node's column: the longest chain of links leading to it."""
    depth: dict[str, int] = {}

    def of(node_id: str) -> int:
        if node_id not in depth:
            sources = [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((of(s) for s in sources), default=-1)
        return depth[node_id]

    for node_id in prompt:
        of(node_id)
    return depth


def _height(info: dict[str, Any], inputs: list, values: list) -> int:
    """A node's height, roughly as the frontend draws it: sockets, widgets, and room for image previews."""
    sockets = max(len([i for i in inputs if "widget" not in i]), len(info["output"]))
    multiline = sum(
        1
        for _, spec in _specs(info)
        if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("multiline")
    )
    shows_images = info.get("output_node") or "IMAGE" in info["output"]
    return 40 + 22 * sockets + 24 * len(values) + 60 * multiline + (260 if shows_images else 0)


def ui_from_api(prompt: dict[str, Any], object_info: dict[str, Any], title: str = "") -> dict[str, Any]:
    """A UI-format workflow for an API-format prompt: every widget shown with its value (defaults for
    the ones the prompt leaves out), sockets linked, nodes laid out left to right by dependency."""
    depth = _depths(prompt)
    rows: dict[int, int] = {}  # per column, where the next node goes
    nodes, links = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        inputs, values = [], []
        for name, spec in _specs(info):
            given = node["inputs"].get(name)
            if is_widget(spec) and not isinstance(given, list):
                values.append(_default(spec) if given is None else given)
                if _control(name, spec):
                    values.append("fixed")
                continue
            link = None
            if isinstance(given, list):
                link = len(links) + 1
                source, slot = given
                source_type = object_info[prompt[source]["class_type"]]["output"][slot]
                links.append([link, int(source), slot, int(node_id), len(inputs), source_type])
                outgoing.setdefault((source, slot), []).append(link)
            entry = {"name": name, "type": _socket_type(spec), "link": link}
            if is_widget(spec):
                entry["widget"] = {"name": name}
            inputs.append(entry)
        column = depth[node_id]
        height = _height(info, inputs, values)
        top = rows.get(column, 40)
        rows[column] = top + height + 60
        nodes.append(
            {
                "id": int(node_id),
                "type": node["class_type"],
                "pos": [40 + 420 * column, top],
                "size": [380, height],
                "flags": {},
                "order": 0,
                "mode": 0,
                "inputs": inputs,
                "outputs": [],
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": values,
            }
        )
    by_id = {str(n["id"]): n for n in nodes}
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        names = info.get("output_name", info["output"])
        by_id[node_id]["outputs"] = [
            {"name": names[i], "type": kind, "links": outgoing.get((node_id, i), []), "slot_index": i}
            for i, kind in enumerate(info["output"])
        ]
    for order, node_id in enumerate(sorted(prompt, key=lambda k: (depth[k], int(k)))):
        by_id[node_id]["order"] = order
    return {
        "last_node_id": max((n["id"] for n in nodes), default=0),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"backdoor_seal": {"title": title}} if title else {},
        "version": 0.4,
    }
