"""Node "Sparse Attention A/B": two decoded runs of the same workflow in, PSNR / SSIM report and a
side-by-side image out. The metrics live in adacluster_core.quality (shared with ``adacluster-ab``).

The V1 class needs no ComfyUI import; the V3 class is defined only where ``comfy_api`` imports."""
from __future__ import annotations

import json

from ..adacluster_core import quality
from .common import CATEGORY
from .widgets import Widget

AB_NODE_ID = "AdaClusterSparseAttentionAB"
AB_DISPLAY_NAME = "Sparse Attention A/B"
AB_DESCRIPTION = (
    "Compares two decoded videos or image batches of the same workflow, for example one sampler with the "
    "sparse attention node and one without, from the same seed. Reports PSNR (whole batch and worst frame) "
    "and SSIM, and returns the chosen frames side by side with an amplified absolute-difference strip.")
AB_WIDGETS = (
    Widget("frames", "STRING", "auto", "Frames shown in the comparison image: 'auto' (first, worst, middle, last) "
           "or a comma list of indices; negative indices count from the end (-1 is the last frame).",
           "frames"),
    Widget("difference_gain", "FLOAT", 4.0, "The absolute difference |A - B| is multiplied by this before it is "
           "drawn, so small differences become visible.", "difference gain", minimum=0.1, maximum=100.0, step=0.1),
    Widget("label_a", "STRING", "dense", "Name of image_a in the report and the image.", "label A", advanced=True),
    Widget("label_b", "STRING", "sparse", "Name of image_b in the report and the image.", "label B", advanced=True),
)
IMAGE_A_TOOLTIP = "The reference run, e.g. the decoded video without the sparse attention node."
IMAGE_B_TOOLTIP = "The run to judge, e.g. the decoded video with the sparse attention node, same seed."
REPORT_TOOLTIP = "PSNR over all frames, SSIM, the worst frame and the per-frame PSNR, as text."
IMAGE_TOOLTIP = "The chosen frames: A in the first row, B in the second, |A - B| x gain in the third."


def ab_outputs(image_a, image_b, frames: str = "auto", difference_gain: float = 4.0, label_a: str = "dense",
               label_b: str = "sparse") -> tuple:
    """(report text, comparison IMAGE, JSON-able dict); ValueError names mismatched inputs or bad frames."""
    names = (f"image_a ({label_a})", f"image_b ({label_b})")
    try:
        result = quality.compare(image_a, image_b, names)
        chosen = quality.choose_frames(frames, result)
        image = quality.comparison_image(image_a, image_b, chosen, gain=difference_gain, labels=(label_a, label_b),
                                         comparison=result)
    except quality.QualityError as exc:
        raise ValueError(f"{AB_DISPLAY_NAME}: {exc}") from exc
    text = result.to_text(label_a, label_b) + "\nframes shown: " + ", ".join(map(str, chosen))
    return text, image, {**result.to_dict(), "frames_shown": chosen}


class SparseAttentionABV1:
    DESCRIPTION = AB_DESCRIPTION
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "comparison")
    OUTPUT_TOOLTIPS = (REPORT_TOOLTIP, IMAGE_TOOLTIP)
    FUNCTION = "compare"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from .v1 import _input_spec

        required = {"image_a": ("IMAGE", {"tooltip": IMAGE_A_TOOLTIP}), "image_b": ("IMAGE", {"tooltip": IMAGE_B_TOOLTIP})}
        for w in AB_WIDGETS:
            required[w.name] = _input_spec(w)
        return {"required": required}

    def compare(self, image_a, image_b, **values):
        text, image, data = ab_outputs(image_a, image_b, **values)
        return {"ui": {"text": (text,), "adacluster_ab": (json.dumps(data),)}, "result": (text, image)}


try:
    from comfy_api.latest import io as _io
except ImportError:  # outside ComfyUI, or a tree without the V3 API
    _io = None

if _io is not None:
    class SparseAttentionAB(_io.ComfyNode):
        @classmethod
        def define_schema(cls):
            from .v3 import _input, _schema

            return _schema(
                node_id=AB_NODE_ID,
                display_name=AB_DISPLAY_NAME,
                category=CATEGORY,
                description=AB_DESCRIPTION,
                search_aliases=["a/b", "ab test", "psnr", "ssim", "compare videos", "sparse attention quality"],
                inputs=[_io.Image.Input("image_a", tooltip=IMAGE_A_TOOLTIP),
                        _io.Image.Input("image_b", tooltip=IMAGE_B_TOOLTIP)] + [_input(w) for w in AB_WIDGETS],
                outputs=[_io.String.Output(display_name="report", tooltip=REPORT_TOOLTIP),
                         _io.Image.Output(display_name="comparison", tooltip=IMAGE_TOOLTIP)],
                is_output_node=True,
            )

        @classmethod
        def execute(cls, image_a, image_b, **values) -> "_io.NodeOutput":
            text, image, data = ab_outputs(image_a, image_b, **values)
            return _io.NodeOutput(text, image, ui={"text": (text,), "adacluster_ab": (json.dumps(data),)})
