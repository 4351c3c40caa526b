"""Starts a real ComfyUI server in a subprocess and talks to it over HTTP (standard library only).

Where ComfyUI is:
* COMFYUI_PATH: a ComfyUI checkout (default: ../.. of the pack when the pack sits in ComfyUI/custom_nodes/);
  COMFYUI_PYTHON: the python of ComfyUI's environment (default: the python running the tests).
* COMFYUI_PATH2 / COMFYUI_PYTHON2: optionally a second checkout (e.g. an older release) tested the same way.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PACK_ROOT = Path(__file__).resolve().parents[2]
TEST_NODES = Path(__file__).resolve().parent / "test_nodes"
BUILDER = Path(__file__).resolve().parent / "build_tiny_checkpoints.py"


@dataclass(frozen=True)
class ComfyTree:
    path: Path
    python: str

    @property
    def version(self) -> str:
        text = (self.path / "comfyui_version.py").read_text() if (self.path / "comfyui_version.py").exists() else ""
        for line in text.splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
        return "unknown"

    @property
    def has_cogvideox(self) -> bool:
        return (self.path / "comfy" / "ldm" / "cogvideo" / "model.py").exists()

    @property
    def label(self) -> str:
        return f"ComfyUI-{self.version}"


def _is_comfy_tree(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "folder_paths.py").is_file()


def find_trees() -> list:
    trees = []
    candidates = [(os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")),
                  (os.environ.get("COMFYUI_PATH2"), os.environ.get("COMFYUI_PYTHON2"))]
    if not candidates[0][0] and _is_comfy_tree(PACK_ROOT.parents[1]):
        candidates[0] = (str(PACK_ROOT.parents[1]), candidates[0][1])
    for path, python in candidates:
        if path and _is_comfy_tree(Path(path)):
            trees.append(ComfyTree(Path(path).resolve(), python or sys.executable))
    return trees


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    tree: ComfyTree
    base: Path
    env_extra: dict = field(default_factory=dict)
    port: int = 0
    process: Optional[subprocess.Popen] = None
    log_path: Optional[Path] = None

    # ------------------------------------------------------------------ setup
    def prepare(self, checkpoints: Path) -> None:
        for name in ("custom_nodes", "models/diffusion_models", "output", "input", "temp", "user"):
            (self.base / name).mkdir(parents=True, exist_ok=True)
        for link, target in (("comfyui-adacluster", PACK_ROOT), ("adacluster_test_nodes", TEST_NODES)):
            dst = self.base / "custom_nodes" / link
            if not dst.exists():
                dst.symlink_to(target, target_is_directory=True)
        for ckpt in checkpoints.glob("*.safetensors"):
            dst = self.base / "models" / "diffusion_models" / ckpt.name
            if not dst.exists():
                dst.symlink_to(ckpt)

    def start(self, timeout: float = 120.0) -> None:
        self.port = free_port()
        self.log_path = self.base / "server.log"
        env = {**os.environ, **self.env_extra}
        cmd = [self.tree.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch"]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(cmd, cwd=self.tree.path, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    # ------------------------------------------------------------------ HTTP
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url(path), timeout=timeout) as response:
            return json.loads(response.read().decode())

    def post(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(self.url(path), data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read().decode()
                return response.status, json.loads(body) if body else {}
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read().decode() or "{}")

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict):
        """POSTs an API-format graph; returns (status, body)."""
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queues a graph and waits for its history entry; raises with the server log on failure."""
        status, body = self.queue(prompt)
        if status != 200:
            raise AssertionError(f"prompt rejected ({status}): {json.dumps(body, indent=1)[:4000]}")
        return self.wait(body["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                    return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log()[-4000:]}")


def build_checkpoints(tree: ComfyTree, out_dir: Path, families: list) -> None:
    result = subprocess.run([tree.python, str(BUILDER), str(out_dir), *families], cwd=tree.path,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"building tiny checkpoints failed:\n{result.stdout}\n{result.stderr}")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
