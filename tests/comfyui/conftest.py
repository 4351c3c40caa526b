"""Fixtures of the ComfyUI integration tests: one real server per ComfyUI checkout, shared by the tests.

Needs COMFYUI_PATH (and optionally COMFYUI_PATH2) pointing at ComfyUI checkouts, and COMFYUI_PYTHON
(COMFYUI_PYTHON2) naming the python of their environment; skips with the reason otherwise."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_server import ComfyServer, build_checkpoints, find_trees, remove_tree  # noqa: E402

TREES = find_trees()
SKIP_REASON = ("no ComfyUI checkout: set COMFYUI_PATH (and COMFYUI_PYTHON to the python of its environment), "
               "or place the pack in ComfyUI/custom_nodes/")


def _families(tree) -> list:
    return ["wan", "hunyuan_video"] + (["cogvideox"] if tree.has_cogvideox else [])


@pytest.fixture(scope="session", params=TREES or [None], ids=lambda t: t.label if t else "no-comfyui")
def comfy(request):
    """A running ComfyUI server (V3 nodes when the tree has comfy_api) with tiny checkpoints."""
    tree = request.param
    if tree is None:
        pytest.skip(SKIP_REASON)
    base = Path(tempfile.mkdtemp(prefix="adacluster-comfy-"))
    build_checkpoints(tree, base / "checkpoints", _families(tree))
    server = ComfyServer(tree, base / "root")
    server.prepare(base / "checkpoints")
    server.start()
    server.families = _families(tree)
    yield server
    server.stop()
    remove_tree(base)


@pytest.fixture(scope="session")
def comfy_v1(comfy):
    """A second server on the same checkout with the V1 node classes forced."""
    server = ComfyServer(comfy.tree, comfy.base.parent / "root-v1", env_extra={"ADACLUSTER_NODE_API": "v1"})
    server.prepare(comfy.base.parent / "checkpoints")
    server.start()
    yield server
    server.stop()
