"""comfyui-adacluster: training-free sparse attention for video diffusion transformers in ComfyUI.

Inside ComfyUI the nodes register through the V3 entry point (``comfy_entrypoint``) when the tree has
``comfy_api``, and through ``NODE_CLASS_MAPPINGS`` (V1) otherwise. Only one of the two is exported:
ComfyUI ignores the entry point of a package that also exports NODE_CLASS_MAPPINGS.
``ADACLUSTER_NODE_API=v1`` forces the V1 classes. Imported outside ComfyUI, the package loads without
touching ComfyUI and exports the V1 mappings (nothing in them imports ComfyUI before a node runs).
"""
import os as _os
import sys as _sys


def _v3_available() -> bool:
    if _os.environ.get("ADACLUSTER_NODE_API", "").lower() == "v1":
        return False
    if "comfy" not in _sys.modules and "folder_paths" not in _sys.modules:
        return False  # not running inside ComfyUI
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        return False
    return True


if _v3_available():
    from .nodes.v3 import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]
else:
    from .nodes.v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
