"""What the V3 and V1 node classes share: applying the patch and building the report outputs.

ComfyUI is imported only inside the functions (through the adapter), so the pack imports without it."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..adacluster_core.config import ConfigError
from ..adacluster_core.jsonable import finite_json
from . import profile_folder
from .widgets import PRESET_AUTO, WIDGETS, config_from_widgets

log = logging.getLogger(__name__)

APPLY_NODE_ID = "AdaClusterSparseAttention"
APPLY_DISPLAY_NAME = "AdaCluster Sparse Attention"
REPORT_NODE_ID = "AdaClusterReport"
REPORT_DISPLAY_NAME = "Sparse Attention Report"
CATEGORY = "model/patch"
APPLY_DESCRIPTION = (
    "Runs the self-attention of Wan 2.1/2.2, HunyuanVideo and CogVideoX with AdaCluster sparse attention: "
    "queries are clustered by direction, keys by adaptive multi-stage clustering, and every query cluster "
    "attends only its critical key clusters. Warm-up steps and the densest layers stay dense. "
    "Returns a patched copy of the model; the input model is unchanged.")
REPORT_DESCRIPTION = (
    "Statistics of the last sampling run of an AdaCluster-patched model: which steps and layers ran sparse, "
    "kept fraction and key clusters per layer, dense layers and attention time, as text and as an image. "
    "Connect the sampler's LATENT output so the report is made after sampling.")
SEARCH_ALIASES = ["sparse attention", "adacluster", "clustered attention", "video speedup", "svg2",
                  "attention acceleration"]


def validation_error(widget, value) -> Optional[str]:
    """The problem with the value of a node's one custom-checked widget (widgets.custom_validator), or None.

    ComfyUI shows it as "<input name> - <problem>" under that input, so the name is not repeated here."""
    return widget.check(value)


def apply_patch(model, preset: str = PRESET_AUTO, verbose: bool = False, calibration_profile: str = "",
                **settings: Any):
    """The patched clone of ``model``; raises ValueError naming a bad value."""
    from ..adacluster_core import comfy_adapter
    from ..adacluster_core.profiles import load_profile

    family = comfy_adapter.detect_family(model)
    if family is None:
        # Unsupported model: an unpatched clone, and one log line from the adapter.
        return comfy_adapter.patch_model(model, config_from_widgets("wan", **settings))
    family_name = family.name if preset == PRESET_AUTO else preset
    if family_name != family.name:
        log.info("[AdaCluster] using the %s preset for a %s model", family_name, family.display)
    try:
        config = config_from_widgets(family_name, **settings)
        path = profile_folder.resolve(calibration_profile)
        profile = load_profile(path) if path is not None else None
    except ConfigError as exc:
        raise ValueError(f"AdaCluster Sparse Attention: {exc}") from exc
    return comfy_adapter.patch_model(model, config, family=family, profile=profile, verbose=verbose)


def report_outputs(model, save_profile: str = "") -> tuple:
    """(text, IMAGE tensor (1, H, W, 3) in [0, 1], JSON-able dict) for the report node.

    With ``save_profile``, the last run's calibration is also saved as a profile file."""
    from ..adacluster_core import comfy_adapter

    patch = comfy_adapter.find_patch(model)
    if patch is None:
        text = "This model is not patched by AdaCluster Sparse Attention (or the model is not supported)."
        return text, _text_image(text), {"patched": False}
    report = patch.cache.report()
    status = patch.status()
    footer = (f"cache after the run: {status['cache_bytes']} bytes in {status['cached_states']} states, "
              f"run active: {status['active']}")
    if patch.last_error:
        footer += f"\nlast run ended with {patch.last_error}"
    if report is None:
        text = f"{patch.label}: no sampling run yet.\n{footer}"
        return text, _text_image(text), {"patched": True, "report": None, "status": status}
    if save_profile:
        footer += "\n" + _save_calibration(patch.cache.last_calibration, save_profile)
    text = f"{patch.label} ({patch.family.display})\n{report.to_text()}\n{footer}"
    image = _report_image(report, patch.label)
    return text, image, {"patched": True, "report": finite_json(report.to_dict()), "status": status}


def _save_calibration(calibration, name: str) -> str:
    """Saves a run's calibration as a profile in the profile folder; returns one line saying what happened."""
    if calibration is None:
        return "no calibration to save: the run never reached its calibration step"
    try:
        path = profile_folder.save(calibration, name)
    except ConfigError as exc:
        log.warning("[AdaCluster] calibration profile not saved: %s", exc)
        return f"calibration profile not saved: {exc}"
    log.info("[AdaCluster] saved calibration profile %s", path)
    return f"calibration profile saved as {path.name!r} in {path.parent}"


def _report_image(report, title: str) -> torch.Tensor:
    from ..adacluster_core.tools.plot import render_report

    return pil_to_image_tensor(render_report(report, title=title))


def _text_image(text: str) -> torch.Tensor:
    """A plain image with a short message, for when there is nothing to plot."""
    from PIL import Image, ImageDraw

    lines = text.splitlines() or [""]
    image = Image.new("RGB", (720, 24 + 18 * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((12, 12 + 18 * i), line, fill=(30, 30, 30))
    return pil_to_image_tensor(image)


def pil_to_image_tensor(image) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: float32 (1, H, W, 3) in [0, 1]."""
    image = image.convert("RGB")
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).to(torch.float32).div(255.0).unsqueeze(0)




WIDGET_NAMES = tuple(w.name for w in WIDGETS)
