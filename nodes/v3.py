"""The nodes in ComfyUI's V3 API (trees with ``comfy_api``). Imported only by the ComfyUI entry point."""
from __future__ import annotations

import inspect
import json

from comfy_api.latest import ComfyExtension, io

from . import common
from .widgets import (NO_PROFILE, REPORT_WIDGETS, SAVE_PROFILE_WIDGET, WIDGETS, WIDGETS_BY_NAME, Widget,
                      custom_validator)

_V3_TYPES = {"FLOAT": io.Float, "INT": io.Int, "COMBO": io.Combo, "BOOLEAN": io.Boolean, "STRING": io.String}


def _supported(fn, kwargs: dict) -> dict:
    """Only the keyword arguments this ComfyUI version knows (e.g. ``advanced`` is newer than 0.3.64)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _input(w: Widget):
    cls = _V3_TYPES[w.kind].Input
    kwargs = {"display_name": w.display_name, "tooltip": w.tooltip, "default": w.default, "advanced": w.advanced,
              "optional": w.optional}
    if w.kind in ("FLOAT", "INT"):
        kwargs.update(min=w.minimum, max=w.maximum, step=w.step)
    if w.kind == "COMBO":
        kwargs["options"] = w.option_list()
    if w.kind == "STRING":
        kwargs["multiline"] = False
    return cls(w.name, **_supported(cls.__init__, kwargs))


def _schema(**kwargs):
    return io.Schema(**_supported(io.Schema, kwargs))


PROFILE_WIDGET = WIDGETS_BY_NAME["calibration_profile"]


class AdaClusterSparseAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id=common.APPLY_NODE_ID,
            display_name=common.APPLY_DISPLAY_NAME,
            category=common.CATEGORY,
            description=common.APPLY_DESCRIPTION,
            search_aliases=common.SEARCH_ALIASES,
            inputs=[io.Model.Input("model", tooltip="A Wan 2.1/2.2, HunyuanVideo or CogVideoX model. Other models "
                                   "pass through unchanged.")] + [_input(w) for w in WIDGETS],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with AdaCluster self-attention.")],
        )

    @classmethod
    def validate_inputs(cls, calibration_profile=NO_PROFILE):
        # Takes only calibration_profile (ComfyUI checks every other range and choice): one error, under it.
        return common.validation_error(PROFILE_WIDGET, calibration_profile) or True

    @classmethod
    def execute(cls, model, **values) -> io.NodeOutput:
        return io.NodeOutput(common.apply_patch(model, **values))


class AdaClusterReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id=common.REPORT_NODE_ID,
            display_name=common.REPORT_DISPLAY_NAME,
            category=common.CATEGORY,
            description=common.REPORT_DESCRIPTION,
            search_aliases=["adacluster report", "sparse attention statistics"],
            inputs=[
                io.Model.Input("model", tooltip="The model returned by AdaCluster Sparse Attention."),
                io.Latent.Input("samples", tooltip="The sampler output made with that model; it makes the report "
                                "wait for the run."),
                _input(SAVE_PROFILE_WIDGET),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="The statistics as text."),
                io.Image.Output(display_name="plot", tooltip="Kept fraction and key clusters per layer and head, "
                                "dense layers and time per layer."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, save_profile=""):
        # Takes only save_profile, so ComfyUI reports a bad name once, under that input.
        return common.validation_error(SAVE_PROFILE_WIDGET, save_profile) or True

    @classmethod
    def fingerprint_inputs(cls, model, samples, save_profile=""):
        return float("nan")  # always re-read: the statistics belong to the latest run

    @classmethod
    def execute(cls, model, samples, save_profile="") -> io.NodeOutput:
        text, image, data = common.report_outputs(model, save_profile)
        return io.NodeOutput(text, image, ui={"text": (text,), "adacluster_report": (json.dumps(data),)})


assert custom_validator(WIDGETS) is PROFILE_WIDGET and custom_validator(REPORT_WIDGETS) is SAVE_PROFILE_WIDGET


class AdaClusterExtension(ComfyExtension):
    async def get_node_list(self):
        from .ab import SparseAttentionAB
        from .method_nodes_v3 import NODES as METHOD_NODES

        return [AdaClusterSparseAttention, AdaClusterReport, *METHOD_NODES, SparseAttentionAB]


async def comfy_entrypoint() -> ComfyExtension:
    return AdaClusterExtension()
