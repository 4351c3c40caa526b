"""The pack imports as an installed package and as a ComfyUI custom-node folder, without ComfyUI or a GPU."""
import subprocess
import sys
import tomllib
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})


def test_installed_package_imports_without_comfyui():
    result = run_python(
        "import sys, comfyui_adacluster\n"
        "from comfyui_adacluster.adacluster_core import attention, cache, config, profiles, selection\n"
        "from comfyui_adacluster import kernels, nodes\n"
        "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules), 'comfy was imported'\n"
        "print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_folder_loads_under_its_own_name_like_comfyui_does(tmp_path):
    """ComfyUI imports a custom node folder as a package named after the folder, via its __init__.py."""
    folder = tmp_path / "comfyui-adacluster"
    folder.symlink_to(PACK, target_is_directory=True)
    result = run_python(
        "import importlib.util, sys\n"
        f"path = {str(folder)!r}\n"
        "spec = importlib.util.spec_from_file_location('comfyui-adacluster', path + '/__init__.py',"
        " submodule_search_locations=[path])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['comfyui-adacluster'] = module\n"
        "spec.loader.exec_module(module)\n"
        "import importlib\n"
        "core = importlib.import_module('comfyui-adacluster.adacluster_core.attention')\n"
        "assert path not in sys.path, 'the pack folder must never be put on sys.path'\n"
        "assert 'comfyui_adacluster' not in sys.modules, 'the pack imported itself by its installed name'\n"
        "print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_manager_and_registry_metadata():
    requirements = (PACK / "requirements.txt").read_text().splitlines()
    names = [line.split(">")[0].split("=")[0].split(";")[0].strip().lower()
             for line in requirements if line.strip() and not line.startswith("#")]
    assert "torch" not in names and {"safetensors", "pyyaml"} <= set(names)
    project = tomllib.loads((PACK / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert "dev" in project["project"]["optional-dependencies"]
