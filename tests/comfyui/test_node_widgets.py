"""Node widgets and adapter helpers that need no ComfyUI (fast; run everywhere)."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from comfyui_adacluster.adacluster_core.config import ConfigError
from comfyui_adacluster.nodes import widgets
from comfyui_adacluster.adacluster_core import comfy_adapter as adapter


def test_widget_defaults_build_every_preset():
    defaults = {w.name: w.default for w in widgets.WIDGETS if w.config_key}
    for family in ("wan", "hunyuan_video", "cogvideox"):
        config = widgets.config_from_widgets(family, **defaults)
        assert config.query_clusters == 130 and config.initial_key_clusters == 200
    # -1 warm-up steps keeps the preset's value
    assert widgets.config_from_widgets("hunyuan_video", warmup_steps=-1).warmup_steps == 3
    assert widgets.config_from_widgets("wan", warmup_steps=-1).warmup_steps == 3
    assert widgets.config_from_widgets("wan", warmup_steps=10).warmup_steps == 10


def test_budget_schedule_widget():
    """'by noise level' keeps the selection's schedule (hybrid: 4x Top-K early; paper: constant), 'same every
    step' asks for one Top-K on every step, as published."""
    by_noise = widgets.config_from_widgets("wan", budget_schedule="by noise level")
    assert by_noise.selection.top_k_scale(0, 50) == 4.0 and by_noise.selection.top_k_scale(30, 50) == 1.0
    constant = widgets.config_from_widgets("wan", budget_schedule="same every step", warmup_steps=10)
    assert all(constant.selection.top_k_scale(step, 50) == 1.0 for step in range(50))
    paper = widgets.config_from_widgets("wan", budget_schedule="by noise level", selection="paper")
    assert paper.selection.top_k_scale(0, 50) == 1.0
    # graphs saved before the widget existed do not send it: they get the default schedule
    assert widgets.config_from_widgets("wan").selection == by_noise.selection
    with pytest.raises(ConfigError, match="budget_schedule = 'fast' is not one of"):
        widgets.config_from_widgets("wan", budget_schedule="fast")


def test_head_budgets_widget():
    """'matched to error' keeps the selection's budgets (hybrid: matched; paper: one Top-K, as published),
    'one Top-K' asks for the same Top-K for every head; graphs without the widget get the default."""
    assert widgets.config_from_widgets("wan").selection.budget == "matched"
    assert widgets.config_from_widgets("wan", head_budgets="matched to error").selection.budget == "matched"
    assert widgets.config_from_widgets("wan", head_budgets="one Top-K").selection.budget == "fixed"
    assert widgets.config_from_widgets("wan", head_budgets="matched to error", selection="paper").selection.budget == "fixed"
    with pytest.raises(ConfigError, match="head_budgets = 'many' is not one of"):
        widgets.config_from_widgets("wan", head_budgets="many")


def test_widget_values_map_to_config_fields():
    config = widgets.config_from_widgets("cogvideox", sparsity_threshold=2.25, query_clusters=33, initial_top_k=17,
                                         top_k_clusters=9, dense_layer_fraction=0.2, selection="paper", min_tokens=513)
    assert (config.sparsity_threshold, config.query_clusters, config.initial_key_clusters) == (2.25, 33, 17)
    assert config.selection.top_k == 9 and config.selection.count == "topk" and config.recipe == "paper"
    assert (config.dense_layer_fraction, config.min_tokens) == (0.2, 513)


@pytest.mark.parametrize("name, value, fragment", [
    ("query_clusters", 0, "query_clusters = 0 is out of range"),
    ("query_clusters", 4097, "[1, 4096]"),
    ("query_clusters", 2.5, "not an integer"),
    ("sparsity_threshold", float("nan"), "sparsity_threshold = nan"),
    ("dense_layer_fraction", 1.5, "[0.0, 1.0]"),
    ("selection", "best", "'best' is not one of"),
    ("warmup_steps", -2, "warmup_steps = -2"),
])
def test_bad_widget_values_name_value_and_range(name, value, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        widgets.config_from_widgets("wan", **{name: value})
    assert fragment in str(info.value)


def test_every_widget_value_in_range_is_accepted_whatever_the_other_widgets():
    # No widget is refused because of another one: a Top-K at or above a layer's cluster count keeps them all.
    for selection in widgets.RECIPES:
        for initial, top_k in ((1, 0), (1, 4096), (3, 31), (4096, 1)):
            config = widgets.config_from_widgets("wan", selection=selection, initial_top_k=initial,
                                                 top_k_clusters=top_k)
            assert config.initial_key_clusters == initial
    assert widgets.config_from_widgets("wan", selection="hybrid", top_k_clusters=0).selection.top_k == 12
    assert widgets.config_from_widgets("wan", selection="paper", top_k_clusters=0).selection.top_k == 64
    assert widgets.config_from_widgets("wan", selection="svg2").method == "svg2"
    assert widgets.config_from_widgets("wan", selection="hybrid").method == "adacluster"


def test_every_combo_lists_its_default_first():
    tables = list(widgets.WIDGETS) + list(widgets.REPORT_WIDGETS)
    combos = [w for w in tables if w.kind == "COMBO"]
    assert {w.name for w in combos} == {"preset", "dense_layers_by", "selection", "calibration_profile",
                                        "budget_schedule", "head_budgets"}
    for w in combos:
        assert w.option_list()[0] == w.default, w.name
    assert widgets.WIDGETS_BY_NAME["dense_layers_by"].option_list() == ["error", "clusters"]
    assert widgets.WIDGETS_BY_NAME["selection"].option_list() == ["hybrid", "paper", "svg2"]
    with pytest.raises(ValueError, match="must be the first option"):
        widgets.Widget("x", "COMBO", "b", "tip", "x", options=("a", "b"))


def test_a_node_has_at_most_one_custom_checked_widget():
    # ComfyUI repeats a custom validator's error under every input it takes: one checked widget per node.
    assert widgets.custom_validator(widgets.WIDGETS) is widgets.WIDGETS_BY_NAME["calibration_profile"]
    assert widgets.custom_validator(widgets.REPORT_WIDGETS) is widgets.SAVE_PROFILE_WIDGET
    checked = widgets.Widget("a", "STRING", "", "tip", "a", check=lambda v: None)
    with pytest.raises(ValueError, match="custom check"):
        widgets.custom_validator((checked, widgets.SAVE_PROFILE_WIDGET))


@pytest.mark.parametrize("name", ["/tmp/x", "../x", "a/b", "a\\b", "..", ".hidden", "x" * 200, "a b", "C:x", "ü"])
def test_save_name_must_be_a_plain_file_name(name):
    message = widgets.check_value(widgets.SAVE_PROFILE_WIDGET, name)
    assert message and message.startswith("save_profile: ") and "plain file name" in message


def test_save_name_accepts_plain_names_and_empty():
    for name in ("", "wan14b_720p_81f", "run-2.safetensors", "a.b"):
        assert widgets.check_value(widgets.SAVE_PROFILE_WIDGET, name) is None


def test_node_validators_take_exactly_one_input():
    import inspect

    from comfyui_adacluster.nodes.v1 import AdaClusterReportV1, AdaClusterSparseAttentionV1

    assert list(inspect.signature(AdaClusterSparseAttentionV1.VALIDATE_INPUTS).parameters) == ["calibration_profile"]
    assert AdaClusterSparseAttentionV1.VALIDATE_INPUTS("") is True
    message = AdaClusterSparseAttentionV1.VALIDATE_INPUTS("../../etc/passwd")
    assert message.startswith("'../../etc/passwd' is not a calibration profile in the adacluster_profiles"), message
    assert list(inspect.signature(AdaClusterReportV1.VALIDATE_INPUTS).parameters) == ["save_profile"]
    assert AdaClusterReportV1.VALIDATE_INPUTS("../evil").startswith("'../evil' is not a plain file name")
    assert AdaClusterReportV1.VALIDATE_INPUTS("fine") is True


def test_branch_keys_keep_cond_and_uncond_apart():
    keys = adapter.branch_keys(4, [1, 0], ["u-neg", "u-pos"])
    assert keys == ((1, "u-neg", 0), (1, "u-neg", 1), (0, "u-pos", 0), (0, "u-pos", 1))
    assert len(set(keys)) == 4
    assert adapter.branch_keys(3, [0, 1], ["a", "b"]) is None  # batch not divisible by chunks
    assert adapter.branch_keys(1, [0], None) == ((0, "None", 0),)


def test_video_token_count_pads_to_the_patch():
    x = torch.zeros(1, 16, 5, 15, 13)
    assert adapter.video_token_count(x, (1, 2, 2)) == 5 * 8 * 7
    assert adapter.video_token_count(x, (2, 2, 2)) == 3 * 8 * 7
    assert adapter.video_token_count(torch.zeros(1, 4, 8, 8), (1, 2, 2)) == -1


def test_masks_follow_comfy_broadcasting():
    assert adapter._mask_4d(torch.zeros(7, 7)).shape == (1, 1, 7, 7)
    assert adapter._mask_4d(torch.zeros(2, 7, 7)).shape == (2, 1, 7, 7)
    assert adapter._mask_4d(torch.zeros(1, 1, 7)).shape == (1, 1, 1, 7)
    assert adapter._mask_4d(None) is None


def _fake_model(module: str, **attrs):
    cls = type("FakeDiT", (), {"__module__": module})
    dm = cls()
    for k, v in attrs.items():
        setattr(dm, k, v)
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=dm))


def test_family_detection():
    wan = adapter.detect_family(_fake_model("comfy.ldm.wan.model", blocks=[0] * 30, patch_size=(1, 2, 2)))
    assert (wan.name, wan.num_layers, wan.joint_text) == ("wan", 30, False)
    old_block = SimpleNamespace(flipped_img_txt=True)
    hv = adapter.detect_family(_fake_model("comfy.ldm.hunyuan_video.model", double_blocks=[old_block] * 20,
                                           single_blocks=[0] * 40, patch_size=[1, 2, 2]))
    assert (hv.num_layers, hv.double_blocks, hv.text_first) == (60, 20, False)  # 0.3.x: image tokens first
    hv_new = adapter.detect_family(_fake_model("comfy.ldm.hunyuan_video.model", double_blocks=[object()] * 2,
                                               single_blocks=[0] * 3, patch_size=[1, 2, 2]))
    assert hv_new.text_first is True
    cog = adapter.detect_family(_fake_model("comfy.ldm.cogvideo.model", blocks=[0] * 42, patch_size=2,
                                            patch_size_t=None))
    assert (cog.text_first, cog.layer_by_count, cog.patch_size) == (True, True, (1, 2, 2))
    assert adapter.detect_family(_fake_model("comfy.ldm.flux.model", double_blocks=[], single_blocks=[])) is None


def test_pack_imports_without_comfyui():
    code = ("import sys, comfyui_adacluster as p; assert 'NODE_CLASS_MAPPINGS' in dir(p); "
            "assert not any(m == 'comfy' or m.startswith(('comfy.', 'comfy_api')) for m in sys.modules), "
            "[m for m in sys.modules if m.startswith('comfy')]")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_v1_input_types_match_the_widget_table():
    from comfyui_adacluster.nodes.v1 import AdaClusterSparseAttentionV1

    spec = AdaClusterSparseAttentionV1.INPUT_TYPES()
    names = list(spec["required"]) + list(spec["optional"])
    assert names == ["model"] + [w.name for w in widgets.WIDGETS]
    assert spec["required"]["query_clusters"][1]["min"] == 1
    assert spec["required"]["selection"][0] == ["hybrid", "paper", "svg2"]
    assert spec["optional"]["calibration_profile"][0] == [""]  # outside ComfyUI: no profile folder
