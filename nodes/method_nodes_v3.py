"""The AdaSpa and MOD-DiT nodes in ComfyUI's V3 API (tables and behaviour: method_nodes.py)."""
from __future__ import annotations

from comfy_api.latest import io

from . import common
from .method_nodes import ADASPA, MODDIT, MODEL_TOOLTIP, MethodNode, apply_method, validation_error


def _schema(node: MethodNode, short: str):
    from .v3 import _input, _schema as schema

    return schema(
        node_id=node.node_id, display_name=node.display_name, category=common.CATEGORY, description=node.description,
        search_aliases=list(node.search_aliases),
        inputs=[io.Model.Input("model", tooltip=MODEL_TOOLTIP)] + [_input(w) for w in node.widgets],
        outputs=[io.Model.Output(display_name="model", tooltip=f"The model with {short} self-attention.")],
    )


class AdaSpaSparseAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(ADASPA, "AdaSpa")

    @classmethod
    def validate_inputs(cls, search_steps="10, 30", search_reference_steps=50):
        # the text of the search steps and its rule against the run length; ComfyUI checks the other ranges
        return validation_error(ADASPA, {"search_steps": search_steps,
                                         "search_reference_steps": search_reference_steps}) or True

    @classmethod
    def execute(cls, model, **values) -> io.NodeOutput:
        return io.NodeOutput(apply_method(ADASPA, model, **values))


class ModDiTSparseAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(MODDIT, "MOD-DiT")

    @classmethod
    def execute(cls, model, **values) -> io.NodeOutput:
        return io.NodeOutput(apply_method(MODDIT, model, **values))


NODES = [AdaSpaSparseAttention, ModDiTSparseAttention]
