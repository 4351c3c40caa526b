"""The profile folder inside ComfyUI: registered with ``folder_paths`` as ``adacluster_profiles``.

The default folder is ``models/adacluster_profiles``; folders given for ``adacluster_profiles`` in
extra_model_paths.yaml are used too (listed first when the yaml marks them as default). Profiles are read
only by a name from that listing and saved only into the first folder, under a plain file name."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..adacluster_core.profiles import EXTENSION, FOLDER_NAME, CalibrationProfile, find_profile, save_profile_in


def _folder_paths():
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def register(folder_paths=None) -> bool:
    """Registers the profile folder with ComfyUI's folder_paths (idempotent); False outside ComfyUI."""
    folder_paths = folder_paths or _folder_paths()
    if folder_paths is None:
        return False
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    folder_paths.add_model_folder_path(FOLDER_NAME, default)  # keeps folders an extra_model_paths.yaml added
    folder_paths.folder_names_and_paths[FOLDER_NAME][1].add(EXTENSION)
    return True


def folders() -> list:
    """The registered profile folders (empty outside ComfyUI)."""
    folder_paths = _folder_paths()
    if folder_paths is None or not register(folder_paths):
        return []
    return folder_paths.get_folder_paths(FOLDER_NAME)


def profile_names() -> list:
    """Names of the profiles ComfyUI finds in the profile folders (what the combo lists)."""
    folder_paths = _folder_paths()
    if folder_paths is None or not register(folder_paths):
        return []
    return [name for name in folder_paths.get_filename_list(FOLDER_NAME) if name.endswith(EXTENSION)]


def resolve(name: str) -> Optional[Path]:
    """The file of a profile chosen by name (None for no profile); ConfigError when it is not listed."""
    if not name:
        return None
    return find_profile(folders(), name)


def save(profile: CalibrationProfile, name: str) -> Path:
    """Saves into the first profile folder under a plain file name; ConfigError says why it did not."""
    found = folders()
    if not found:
        from ..adacluster_core.config import ConfigError

        raise ConfigError("no profile folder: saving a calibration profile needs ComfyUI's models folder")
    return save_profile_in(profile, found[0], name)
