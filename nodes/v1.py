"""The same nodes in ComfyUI's V1 API, for trees without ``comfy_api``. No ComfyUI import at module level."""
from __future__ import annotations

import json

from . import common
from .widgets import (NO_PROFILE, REPORT_WIDGETS, SAVE_PROFILE_WIDGET, WIDGETS, WIDGETS_BY_NAME, Widget,
                      custom_validator)


def _input_spec(w: Widget):
    info = {"default": w.default, "tooltip": w.tooltip, "display_name": w.display_name}
    if w.advanced:
        info["advanced"] = True
    if w.kind in ("FLOAT", "INT"):
        info.update(min=w.minimum, max=w.maximum, step=w.step)
    if w.kind == "COMBO":
        return (w.option_list(), info)
    if w.kind == "STRING":
        info["multiline"] = False
    return (w.kind, info)


PROFILE_WIDGET = WIDGETS_BY_NAME["calibration_profile"]


class AdaClusterSparseAttentionV1:
    DESCRIPTION = common.APPLY_DESCRIPTION
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with AdaCluster self-attention.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        required = {"model": ("MODEL", {"tooltip": "A Wan 2.1/2.2, HunyuanVideo or CogVideoX model. Other models "
                                        "pass through unchanged."})}
        optional = {}
        for w in WIDGETS:
            (optional if w.optional else required)[w.name] = _input_spec(w)
        return {"required": required, "optional": optional}

    @classmethod
    def VALIDATE_INPUTS(cls, calibration_profile=NO_PROFILE):
        # Takes only calibration_profile (ComfyUI checks every other range and choice): one error, under it.
        return common.validation_error(PROFILE_WIDGET, calibration_profile) or True

    def patch(self, model, **values):
        return (common.apply_patch(model, **values),)


class AdaClusterReportV1:
    DESCRIPTION = common.REPORT_DESCRIPTION
    CATEGORY = common.CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "plot")
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model returned by AdaCluster Sparse Attention."}),
            "samples": ("LATENT", {"tooltip": "The sampler output made with that model; it makes the report wait "
                                   "for the run."}),
        }, "optional": {SAVE_PROFILE_WIDGET.name: _input_spec(SAVE_PROFILE_WIDGET)}}

    @classmethod
    def VALIDATE_INPUTS(cls, save_profile=""):
        # Takes only save_profile, so ComfyUI reports a bad name once, under that input.
        return common.validation_error(SAVE_PROFILE_WIDGET, save_profile) or True

    @classmethod
    def IS_CHANGED(cls, model, samples, save_profile=""):
        return float("nan")

    def report(self, model, samples, save_profile=""):
        text, image, data = common.report_outputs(model, save_profile)
        return {"ui": {"text": (text,), "adacluster_report": (json.dumps(data),)}, "result": (text, image)}


assert custom_validator(WIDGETS) is PROFILE_WIDGET and custom_validator(REPORT_WIDGETS) is SAVE_PROFILE_WIDGET
from .ab import AB_DISPLAY_NAME, AB_NODE_ID, SparseAttentionABV1  # noqa: E402

NODE_CLASS_MAPPINGS = {
    common.APPLY_NODE_ID: AdaClusterSparseAttentionV1,
    common.REPORT_NODE_ID: AdaClusterReportV1,
    AB_NODE_ID: SparseAttentionABV1,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    common.APPLY_NODE_ID: common.APPLY_DISPLAY_NAME,
    common.REPORT_NODE_ID: common.REPORT_DISPLAY_NAME,
    AB_NODE_ID: AB_DISPLAY_NAME,
}

# AdaSpa and MOD-DiT (method_nodes.py)
from .method_nodes import V1_CLASSES as _METHOD_CLASSES, V1_DISPLAY_NAMES as _METHOD_NAMES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_METHOD_CLASSES)
NODE_DISPLAY_NAME_MAPPINGS.update(_METHOD_NAMES)
