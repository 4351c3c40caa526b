"""A/B of one workflow on a running ComfyUI: the sparse attention node bypassed, then enabled.

    adacluster-ab workflow_api.json [--server http://127.0.0.1:8188] [--node 5] [--seed 42] [--out DIR]

The workflow is an API-format graph (the editor's "Export (API)"). The sparse node is found by its class
type (``AdaClusterSparseAttention``; every one of them is bypassed, so a Wan 2.2 graph with one node per
expert works) unless ``--node`` names it. The graph is queued twice with the same seed: first with the
sparse node(s) bypassed (their consumers get the node's own model input), then as it is. The images the
output nodes save are fetched from the server (``/view``) and compared with the metrics of the
"Sparse Attention A/B" node: PSNR over all frames, SSIM, per-frame worst PSNR. It prints the report, the
wall time of each run (from the server's execution messages) and the peak VRAM in use seen by polling
``/system_stats`` while the run executes (the server exposes no true peak), and writes the comparison
image and a JSON file.

Use lossless outputs (Save Image writes PNG frames) so the comparison measures the attention, not a codec.
ComfyUI caches node outputs between prompts: nodes shared by both runs (loaders, text encoders) run in the
first only; ``--fresh`` frees the server's caches and models before each run so both include them.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

SPARSE_CLASS_TYPES = ("AdaClusterSparseAttention",)
SEED_INPUTS = ("seed", "noise_seed")
POLL_S = 0.5


class ABError(Exception):
    """A problem with the workflow, the server or a run; printed without a traceback."""


# ------------------------------------------------------------------------------------------------ HTTP
class Server:
    def __init__(self, base: str, timeout: float = 30.0):
        self.base = base.rstrip("/")
        self.timeout = timeout

    def _open(self, request, what: str):
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ABError(f"cannot reach ComfyUI at {self.base} ({what}): {reason}. Start it (python main.py "
                          "--listen 127.0.0.1 --port 8188) or pass --server URL") from None

    def get_json(self, path: str):
        with self._open(self.base + path, f"GET {path.split('?')[0]}") as response:
            return json.loads(response.read().decode())

    def get_bytes(self, path: str) -> bytes:
        with self._open(self.base + path, "GET /view") as response:
            return response.read()

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.base + path, data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with self._open(request, f"POST {path}") as response:
                body = response.read().decode()
                return response.status, json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            try:
                return exc.code, json.loads(body)
            except json.JSONDecodeError:
                return exc.code, {"error": {"message": body.strip()[:2000]}}


# --------------------------------------------------------------------------------------------- graph
def load_workflow(path: str) -> dict:
    try:
        graph = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ABError(f"cannot read the workflow {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ABError(f"the workflow {path} is not JSON: {exc}") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise ABError(f"{path} is in the editor's UI format; save it with Workflow > Export (API) and pass that file")
    if isinstance(graph, dict) and isinstance(graph.get("prompt"), dict):
        graph = graph["prompt"]
    if not isinstance(graph, dict) or not graph or not all(isinstance(n, dict) and "class_type" in n
                                                           for n in graph.values()):
        raise ABError(f"{path} is not an API-format workflow (a JSON object of nodes with class_type and inputs)")
    return graph


def find_sparse_nodes(graph: dict, given: Optional[list]) -> list:
    if given:
        missing = [n for n in given if n not in graph]
        if missing:
            raise ABError(f"--node {missing[0]}: the workflow has no node with that id (ids: "
                          f"{', '.join(sorted(graph, key=_id_order))})")
        return list(given)
    found = [n for n, node in graph.items() if node["class_type"] in SPARSE_CLASS_TYPES]
    if not found:
        raise ABError(f"no sparse attention node in the workflow: no node has class_type "
                      f"{' or '.join(SPARSE_CLASS_TYPES)}. Add the AdaCluster Sparse Attention node, or name the "
                      "node to bypass with --node ID")
    return sorted(found, key=_id_order)


def _id_order(node_id: str):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def output_nodes(graph: dict, object_info: dict) -> list:
    """Ids of the nodes whose class is an output node (ComfyUI executes the graph from these)."""
    unknown = sorted({n["class_type"] for n in graph.values() if n["class_type"] not in object_info})
    if unknown:
        raise ABError(f"the server does not know the node class {unknown[0]!r}: is the custom node pack "
                      "that provides it installed there?")
    found = [n for n, node in graph.items() if object_info[node["class_type"]].get("output_node")]
    if not found:
        raise ABError("the workflow has no output node (for example Save Image after VAE Decode): ComfyUI "
                      "would not run it, and there would be no images to compare")
    return sorted(found, key=_id_order)


def _input_types(info: dict) -> dict:
    types = {}
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], str):
                types[name] = spec[0]
    return types


def bypass(graph: dict, node_ids: list, object_info: dict) -> dict:
    """A copy of ``graph`` without ``node_ids``: each consumer of a bypassed node's output gets the
    node's first input of the same type, as the editor's bypass does."""
    graph = json.loads(json.dumps(graph))
    for node_id in node_ids:
        node = graph[node_id]
        info = object_info[node["class_type"]]
        inputs = _input_types(info)
        replacements = {}
        for slot, out_type in enumerate(info.get("output", [])):
            source = next((node["inputs"][name] for name, t in inputs.items()
                           if t == out_type and isinstance(node["inputs"].get(name), list)), None)
            replacements[slot] = source
        del graph[node_id]
        for other_id, other in graph.items():
            for name, value in other.get("inputs", {}).items():
                if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id):
                    source = replacements.get(int(value[1]))
                    if source is None:
                        raise ABError(f"cannot bypass node {node_id} ({node['class_type']}): its output "
                                      f"{value[1]} feeds node {other_id} but it has no input of that type")
                    other["inputs"][name] = list(source)
    return graph


def set_seed(graph: dict, seed: int) -> list:
    """Sets every plain seed/noise_seed input; returns the nodes changed."""
    changed = []
    for node_id, node in graph.items():
        for name in SEED_INPUTS:
            if name in node.get("inputs", {}) and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = seed
                changed.append(node_id)
    return changed


# ------------------------------------------------------------------------------------------------ runs
def format_node_errors(body: dict, graph: dict) -> str:
    lines = []
    error = body.get("error") or {}
    if isinstance(error, dict) and error.get("message"):
        lines.append(f"{error.get('message')}{': ' + error['details'] if error.get('details') else ''}")
    for node_id, entry in (body.get("node_errors") or {}).items():
        class_type = entry.get("class_type") or graph.get(node_id, {}).get("class_type", "?")
        for err in entry.get("errors", []) or [{}]:
            detail = err.get("details") or ""
            lines.append(f"  node {node_id} ({class_type}): {err.get('message', 'error')}"
                         f"{': ' + detail if detail else ''}")
    return "\n".join(lines) or json.dumps(body)[:2000]


def _vram_in_use(stats: dict) -> Optional[int]:
    for device in stats.get("devices", []):
        if device.get("type") == "cuda" and device.get("vram_total") is not None:
            return int(device["vram_total"]) - int(device.get("vram_free", 0))
    return None


def run_prompt(server: Server, graph: dict, label: str, timeout: float) -> dict:
    """Queues ``graph``, waits for it; returns its history entry, wall time and sampled VRAM."""
    status, body = server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    if status != 200 or "prompt_id" not in body:
        raise ABError(f"ComfyUI refused the {label} prompt (HTTP {status}):\n{format_node_errors(body, graph)}")
    prompt_id = body["prompt_id"]
    started = time.time()
    peak = None
    while True:
        history = server.get_json(f"/history/{prompt_id}")
        entry = history.get(prompt_id)
        state = (entry or {}).get("status", {})
        if entry is not None and (state.get("completed") or state.get("status_str") in ("error", "success")):
            break
        if time.time() - started > timeout:
            server.post("/interrupt", {"prompt_id": prompt_id})
            server.post("/queue", {"delete": [prompt_id]})
            raise ABError(f"the {label} run did not finish within the time limit of {timeout:g} s; it was "
                          "interrupted (raise --timeout for long videos)")
        try:
            used = _vram_in_use(server.get_json("/system_stats"))
        except ABError:
            used = None
        if used is not None:
            peak = used if peak is None else max(peak, used)
        time.sleep(POLL_S)
    messages = state.get("messages", [])
    if state.get("status_str") == "error" or not state.get("completed"):
        failure = next((data for event, data in messages if event == "execution_error"), None)
        if failure is None:
            interrupted = next((data for event, data in messages if event == "execution_interrupted"), None)
            where = f" in node {interrupted.get('node_id')}" if interrupted else ""
            raise ABError(f"the {label} run did not complete{where} (status {state.get('status_str')!r})")
        raise ABError(f"the {label} run failed in node {failure.get('node_id')} ({failure.get('node_type')}): "
                      f"{failure.get('exception_type', 'error')}: {str(failure.get('exception_message', '')).strip()}")
    stamps = {event: data.get("timestamp") for event, data in messages if isinstance(data, dict)}
    wall = None
    if stamps.get("execution_start") and stamps.get("execution_success"):
        wall = (stamps["execution_success"] - stamps["execution_start"]) / 1000.0
    cached = next((data.get("nodes", []) for event, data in messages if event == "execution_cached"), [])
    return {"prompt_id": prompt_id, "outputs": entry.get("outputs", {}), "wall_s": wall,
            "client_wall_s": time.time() - started, "peak_vram_in_use_bytes": peak, "cached_nodes": cached}


def fetch_images(server: Server, outputs: dict, node_id: str):
    """The frames saved by one output node as an IMAGE batch (frames, H, W, 3) and the file names."""
    import torch
    from PIL import Image, ImageSequence

    frames, names = [], []
    for item in outputs.get(node_id, {}).get("images", []) or []:
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output")})
        data = server.get_bytes(f"/view?{query}")
        try:
            image = Image.open(io.BytesIO(data))
            for frame in ImageSequence.Iterator(image):
                rgb = frame.convert("RGB")
                tensor = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
                frames.append(tensor.view(rgb.height, rgb.width, 3).to(torch.float32) / 255.0)
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
            raise ABError(f"cannot decode {item['filename']} from node {node_id}: {exc}. Compare PNG frames "
                          "(Save Image) or animated WEBP/GIF outputs") from None
        names.append(item["filename"])
    if not frames:
        return None, names
    sizes = {tuple(f.shape) for f in frames}
    if len(sizes) > 1:
        raise ABError(f"node {node_id} saved frames of different sizes {sorted(sizes)}")
    return torch.stack(frames), names


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="adacluster-ab", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", help="API-format workflow JSON")
    p.add_argument("--server", default=os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188"),
                   help="ComfyUI address (default $COMFYUI_URL or http://127.0.0.1:8188)")
    p.add_argument("--node", action="append", help="id of the sparse node to bypass (repeatable; default: every "
                   "node of class " + ", ".join(SPARSE_CLASS_TYPES) + ")")
    p.add_argument("--seed", type=int, default=None, help="set every seed / noise_seed input to this value "
                   "(default: keep the workflow's; both runs use the same)")
    p.add_argument("--timeout", type=float, default=3600.0, help="time limit per run in seconds (default 3600)")
    p.add_argument("--fresh", action="store_true", help="free the server's caches and models before each run")
    p.add_argument("--frames", default="auto", help="frames of the comparison image ('auto' or '0, 40, -1')")
    p.add_argument("--gain", type=float, default=4.0, help="gain of the difference strip (default 4)")
    p.add_argument("--out", default="output/ab", help="folder for the comparison PNG and the JSON")
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error(f"--timeout {args.timeout:g} is out of range: expected seconds > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ABError as exc:
        print(f"adacluster-ab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adacluster-ab: stopped", file=sys.stderr)
        return 130


def run(args) -> int:
    from .. import quality

    graph = load_workflow(args.workflow)
    sparse_ids = find_sparse_nodes(graph, args.node)
    server = Server(args.server)
    object_info = server.get_json("/object_info")
    outputs = output_nodes(graph, object_info)
    if args.seed is not None:
        set_seed(graph, args.seed)
    dense_graph = bypass(graph, sparse_ids, object_info)
    labels = ("dense (sparse node bypassed)", "sparse")
    runs = []
    for label, g in zip(labels, (dense_graph, graph)):
        if args.fresh:
            server.post("/free", {"unload_models": True, "free_memory": True})
        print(f"queueing the {label} run ...", file=sys.stderr, flush=True)
        runs.append(run_prompt(server, g, label, args.timeout))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    comparisons, texts = {}, []
    for node_id in outputs:
        a, names_a = fetch_images(server, runs[0]["outputs"], node_id)
        b, names_b = fetch_images(server, runs[1]["outputs"], node_id)
        if a is None or b is None:
            continue
        names = (f"node {node_id} {labels[0]}", f"node {node_id} {labels[1]}")
        try:
            result = quality.compare(a, b, names)
            chosen = quality.choose_frames(args.frames, result)
            image = quality.comparison_image(a, b, chosen, gain=args.gain, labels=("dense", "sparse"),
                                             comparison=result)
        except quality.QualityError as exc:
            raise ABError(str(exc)) from None
        png = out_dir / f"ab-{stamp}-node{node_id}.png"
        _save_png(image, png)
        comparisons[node_id] = {**result.to_dict(), "frames_shown": chosen, "image": str(png),
                                "files": {"dense": names_a, "sparse": names_b}}
        texts.append(f"output node {node_id} ({graph[node_id]['class_type']}):\n"
                     + result.to_text("dense", "sparse") + f"\ncomparison image: {png}")
    if not comparisons:
        raise ABError(f"the output nodes ({', '.join(outputs)}) saved no images in both runs: add Save Image after "
                      "VAE Decode")
    print("\n\n".join(texts))
    for label, r in zip(labels, runs):
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f} s"
        vram = "not exposed by this server" if r["peak_vram_in_use_bytes"] is None else \
            f"{r['peak_vram_in_use_bytes'] / 2 ** 20:,.0f} MiB (device-wide, polled)"
        cached = f", {len(r['cached_nodes'])} nodes from ComfyUI's cache" if r["cached_nodes"] else ""
        print(f"{label}: wall {wall}{cached}; peak VRAM in use {vram}")
    if runs[0]["wall_s"] and runs[1]["wall_s"]:
        print(f"speedup of the whole prompt: {runs[0]['wall_s'] / runs[1]['wall_s']:.2f}x")
    result = {"workflow": str(args.workflow), "server": server.base, "sparse_nodes": sparse_ids,
              "output_nodes": outputs, "runs": {label: {k: v for k, v in r.items() if k != "outputs"}
                                                 for label, r in zip(labels, runs)},
              "comparisons": comparisons}
    path = out_dir / f"ab-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=_json_default))
    print(f"wrote {path}")
    return 0


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _save_png(image, path: Path) -> None:
    from PIL import Image

    data = (image[0].clamp(0, 1) * 255).round().to("cpu").byte().numpy()
    Image.fromarray(data, "RGB").save(path)


if __name__ == "__main__":
    sys.exit(main())
