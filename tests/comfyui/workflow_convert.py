"""Checks of shipped workflows against a server's /object_info: UI format -> API format, and validation.

The editor's UI format stores widget values positionally (in the node's input order, widgets only, with
one extra value after every seed that has control_after_generate); links carry the rest."""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Inputs whose options are files on the server: the shipped names need not exist on a test server.
FILE_INPUTS = {"unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "ckpt_name", "lora_name"}


def _inputs(info: dict) -> list:
    """(name, spec) in the node's input order (required, then optional)."""
    order = info.get("input_order") or {}
    spec = info["input"]
    names = list(order.get("required", spec.get("required", {}))) + list(order.get("optional", spec.get("optional", {})))
    merged = {**spec.get("required", {}), **spec.get("optional", {})}
    return [(name, merged[name]) for name in names if name in merged]


def _kind(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _is_widget(spec) -> bool:
    return _kind(spec) in WIDGET_TYPES


def ui_to_api(ui: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in ("Note", "MarkdownNote"):
            continue  # muted / bypassed nodes and notes are not part of the API graph
        info = object_info[node["type"]]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in _inputs(info):
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
                if _is_widget(spec) and values:
                    values.pop(0)  # a widget converted to an input keeps its slot
                    if len(spec) > 1 and spec[1].get("control_after_generate"):
                        values.pop(0)
                continue
            if not _is_widget(spec):
                continue
            if not values:
                raise ValueError(f"node {node['id']} ({node['type']}) has no widget value for {name!r}")
            inputs[name] = values.pop(0)
            if len(spec) > 1 and spec[1].get("control_after_generate"):
                values.pop(0)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}) has {len(values)} unused widget values: {values}")
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def validate_api(api: dict, object_info: dict) -> list:
    """Problems of an API graph against /object_info: unknown nodes, missing or unknown inputs, widget values
    of the wrong type, out of range or not among the options, links to missing nodes or outputs."""
    problems = []
    for node_id, node in api.items():
        cls = node["class_type"]
        if cls not in object_info:
            problems.append(f"{node_id}: unknown node type {cls}")
            continue
        info = object_info[cls]
        required = info["input"].get("required", {})
        known = {**required, **info["input"].get("optional", {})}
        for name in required:
            if name not in node["inputs"]:
                problems.append(f"{node_id} ({cls}): missing input {name}")
        for name, value in node["inputs"].items():
            if name not in known:
                problems.append(f"{node_id} ({cls}): unknown input {name}")
                continue
            spec = known[name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source = api.get(value[0])
                if source is None:
                    problems.append(f"{node_id} ({cls}): input {name} links to missing node {value[0]}")
                elif value[1] >= len(object_info.get(source["class_type"], {}).get("output", [])):
                    problems.append(f"{node_id} ({cls}): input {name} links to a missing output {value}")
                continue
            problems += [f"{node_id} ({cls}): {p}" for p in _check_value(name, spec, value)]
    return problems


def _check_value(name, spec, value) -> list:
    kind = _kind(spec)
    extra = spec[1] if len(spec) > 1 else {}
    if kind == "COMBO":
        options = spec[0] if isinstance(spec[0], list) else extra.get("options", [])
        if name in FILE_INPUTS:
            return [] if isinstance(value, str) and value.endswith((".safetensors", ".sft", ".pt")) else \
                [f"{name} = {value!r} is not a model file name"]
        return [] if value in options else [f"{name} = {value!r} not in {options}"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{name} = {value!r} is not a boolean"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{name} = {value!r} is not a string"]
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            return [f"{name} = {value!r} is not a number of type {kind}"]
        if "min" in extra and value < extra["min"] or "max" in extra and value > extra["max"]:
            return [f"{name} = {value!r} outside [{extra.get('min')}, {extra.get('max')}]"]
    return []
