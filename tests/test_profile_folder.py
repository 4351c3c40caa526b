"""Profile files stay inside the registered profile folders (fake ComfyUI folder_paths; no ComfyUI needed)."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from comfyui_adacluster.adacluster_core.config import ConfigError
from comfyui_adacluster.adacluster_core.profiles import CalibrationProfile, is_saved_profile, load_profile
from comfyui_adacluster.nodes import profile_folder, widgets


def _fake_folder_paths(models_dir, extra=None):
    """The few folder_paths functions the pack uses, behaving as ComfyUI's do."""
    module = types.ModuleType("folder_paths")
    module.models_dir = str(models_dir)
    module.folder_names_and_paths = {}

    def add_model_folder_path(name, path, is_default=False):
        if name in module.folder_names_and_paths:
            paths = module.folder_names_and_paths[name][0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)
        else:
            module.folder_names_and_paths[name] = ([path], set())

    def get_folder_paths(name):
        return module.folder_names_and_paths[name][0][:]

    def get_filename_list(name):
        paths, exts = module.folder_names_and_paths[name]
        found = set()
        for folder in paths:
            for root, _, files in os.walk(folder):
                for f in files:
                    if not exts or os.path.splitext(f)[1] in exts:
                        found.add(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
        return sorted(found)

    module.add_model_folder_path = add_model_folder_path
    module.get_folder_paths = get_folder_paths
    module.get_filename_list = get_filename_list
    if extra is not None:  # what extra_model_paths.yaml does before custom nodes load
        add_model_folder_path("adacluster_profiles", str(extra))
    return module


def _profile(seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 50, (3, 2), generator=g)
    return CalibrationProfile([0, 1, 2], counts, frozenset({1}), heads=2, tokens=1000)


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    extra = tmp_path / "extra_profiles"
    module = _fake_folder_paths(tmp_path / "models", extra)
    monkeypatch.setitem(sys.modules, "folder_paths", module)
    return tmp_path, module


def test_registration_keeps_extra_model_paths_and_filters_safetensors(comfy_folders):
    tmp_path, module = comfy_folders
    assert profile_folder.register()
    assert profile_folder.register()  # idempotent
    paths, exts = module.folder_names_and_paths["adacluster_profiles"]
    assert paths == [str(tmp_path / "extra_profiles"), str(tmp_path / "models" / "adacluster_profiles")]
    assert exts == {".safetensors"}


def test_combo_lists_profiles_of_every_folder_with_none_first(comfy_folders):
    tmp_path, _ = comfy_folders
    default = tmp_path / "models" / "adacluster_profiles"
    default.mkdir(parents=True)
    profile_folder.register()
    from comfyui_adacluster.adacluster_core.profiles import save_profile

    save_profile(_profile(1), default / "b.safetensors")
    save_profile(_profile(2), tmp_path / "extra_profiles" / "a.safetensors")
    (default / "notes.txt").write_text("not a profile")
    options = widgets.WIDGETS_BY_NAME["calibration_profile"].option_list()
    assert options == ["", "a.safetensors", "b.safetensors"]
    loaded = load_profile(profile_folder.resolve("b.safetensors"))
    assert torch.equal(loaded.counts, _profile(1).counts)
    assert profile_folder.resolve("") is None


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "missing.safetensors",
                                  "../models/adacluster_profiles/../../outside.safetensors"])
def test_loading_reads_only_listed_profiles(comfy_folders, name):
    tmp_path, _ = comfy_folders
    from comfyui_adacluster.adacluster_core.profiles import save_profile

    save_profile(_profile(), tmp_path / "outside.safetensors")  # a valid profile, but outside every folder
    with pytest.raises(ConfigError, match="is not in the adacluster_profiles folder"):
        profile_folder.resolve(name)


def test_saving_writes_a_plain_name_into_the_first_folder_only(comfy_folders):
    tmp_path, _ = comfy_folders
    before = set(tmp_path.rglob("*"))
    path = profile_folder.save(_profile(), "run_720p")
    assert path == tmp_path / "extra_profiles" / "run_720p.safetensors" and is_saved_profile(path)
    assert set(tmp_path.rglob("*")) - before == {path.parent, path}
    # Saving again replaces the pack's own profile.
    profile_folder.save(_profile(5), "run_720p.safetensors")
    assert torch.equal(load_profile(path).counts, _profile(5).counts)


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "sub/dir", ".."])
def test_saving_refuses_names_that_are_not_plain(comfy_folders, name):
    tmp_path, _ = comfy_folders
    before = set(tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match="not a plain file name"):
        profile_folder.save(_profile(), name)
    assert set(tmp_path.rglob("*")) == before


def test_saving_never_overwrites_a_file_that_is_not_a_profile(comfy_folders):
    tmp_path, _ = comfy_folders
    folder = tmp_path / "extra_profiles"
    folder.mkdir()
    weights = folder / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.randn(4, 4)}, str(weights))
    content = weights.read_bytes()
    with pytest.raises(ConfigError, match="not a calibration profile saved by this pack"):
        profile_folder.save(_profile(), "model")
    assert weights.read_bytes() == content
    target = tmp_path / "elsewhere.safetensors"
    target.write_bytes(b"user data")
    (folder / "link.safetensors").symlink_to(target)
    with pytest.raises(ConfigError, match="not overwritten"):
        profile_folder.save(_profile(), "link")
    assert target.read_bytes() == b"user data"
    assert not [p for p in folder.iterdir() if p.name.startswith(".adacluster-")]  # no temporary left


def test_report_line_says_why_a_profile_was_not_saved(comfy_folders):
    from comfyui_adacluster.nodes.common import _save_calibration

    tmp_path, _ = comfy_folders
    (tmp_path / "extra_profiles").mkdir()
    (tmp_path / "extra_profiles" / "taken.safetensors").write_bytes(b"not safetensors")
    line = _save_calibration(_profile(), "taken")
    assert line.startswith("calibration profile not saved:") and "not overwritten" in line
    assert _save_calibration(_profile(), "fresh").startswith("calibration profile saved as 'fresh.safetensors'")
