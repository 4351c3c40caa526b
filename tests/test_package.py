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


def test_pillow_is_declared_where_the_pack_imports_it():
    project = tomllib.loads((PACK / "pyproject.toml").read_text())["project"]
    assert any(d.lower().startswith("pillow") for d in project["dependencies"])
    assert any(line.lower().startswith("pillow") for line in (PACK / "requirements.txt").read_text().splitlines())
    assert not any(d.lower().startswith("matplotlib") for extra in project["optional-dependencies"].values()
                   for d in extra)  # nothing imports it


def test_main_command_runs_without_the_dev_extra(tmp_path):
    """tqdm and pytest (the dev extra) blocked: the main command still runs and writes its files."""
    code = ("import sys\n"
            "for name in ('tqdm', 'pytest', 'matplotlib'):\n"
            "    sys.modules[name] = None  # import now raises ImportError\n"
            "from comfyui_adacluster.adacluster_core.tools import demo\n"
            f"sys.exit(demo.main(['--quick', '--layers', '1', '--steps', '2', '--out-dir', {str(tmp_path)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "adacluster_demo.json").is_file() and (tmp_path / "adacluster_demo.png").is_file()


def test_every_example_workflow_has_a_same_named_thumbnail():
    from PIL import Image

    workflows = sorted((PACK / "workflows").glob("*.json"))
    assert len(workflows) >= 5  # one per model family, plus the A/B example and one per extra method
    for workflow in workflows:
        thumbnail = workflow.with_suffix(".png")
        assert thumbnail.is_file(), thumbnail.name
        with Image.open(thumbnail) as image:
            assert image.format == "PNG" and 256 <= image.width <= 1024 and image.height >= 192
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 16  # a drawn card, not blank
    assert sorted(p.stem for p in (PACK / "workflows").glob("*.png")) == [p.stem for p in workflows]


def test_no_docstring_cites_files_users_do_not_have():
    for path in PACK.rglob("*.py"):
        if ".venv" in path.parts or "tests" in path.relative_to(PACK).parts[:1]:
            continue
        text = path.read_text()
        for name in ("ALGORITHMS.md", "PERFORMANCE.md", "DESIGN.md", "COMFYUI.md"):
            assert name not in text, f"{path.relative_to(PACK)} cites {name}"
