"""The AdaSpa and MOD-DiT node tables without ComfyUI: widget values -> method settings, errors, V1 specs."""
import pytest

from comfyui_adacluster import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_adacluster.adacluster_core.config import ConfigError
from comfyui_adacluster.nodes import method_nodes as M


def test_widget_values_map_to_method_settings():
    config = M.adaspa_config({"sparsity": 0.7, "search_steps": "5;25", "search_reference_steps": 30,
                              "head_adaptive": False})
    assert (config.sparsity, config.search_steps, config.reference_steps, config.head_adaptive) == \
        (0.7, (5, 25), 30, False)
    assert M.moddit_config("hunyuan_video", {}).top_k == 300
    assert M.moddit_config("cogvideox", {"pattern_top_k": 0}).top_k == 100
    config = M.moddit_config("wan", {"pattern_top_k": 77, "warmup_steps": 4, "refresh_interval": 3,
                                     "frame_threshold": 0.25})
    assert (config.top_k, config.warmup_steps, config.refresh_interval, config.tau_e) == (77, 4, 3, 0.25)


@pytest.mark.parametrize("node, values, fragment", [
    (M.ADASPA, {"sparsity": 1.2}, "sparsity = 1.2 is out of range"),
    (M.ADASPA, {"search_steps": "10, x"}, "'10, x'"),
    (M.ADASPA, {"search_steps": "10, 30", "search_reference_steps": 20}, "[0, 19]"),
    (M.ADASPA, {"head_adaptive": "yes"}, "head_adaptive must be true or false"),
    (M.MODDIT, {"warmup_steps": 0}, "warmup_steps = 0 is out of range"),
    (M.MODDIT, {"pattern_top_k": 2.5}, "pattern_top_k = 2.5"),
    (M.MODDIT, {"depth": 3}, "unknown widget 'depth'"),
])
def test_bad_values_are_named(node, values, fragment):
    message = M.validation_error(node, values)
    assert message is not None and fragment in message, message
    with pytest.raises(ConfigError):
        node.build("wan", values)


def test_nodes_register_in_v1_with_tooltips():
    for node in M.METHOD_NODES:
        assert node.node_id in NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS[node.node_id] == node.display_name
        spec = NODE_CLASS_MAPPINGS[node.node_id].INPUT_TYPES()["required"]
        assert list(spec) == ["model"] + [w.name for w in node.widgets]
        assert all(spec[w.name][1]["tooltip"] for w in node.widgets)
    assert M.AdaSpaSparseAttentionV1.VALIDATE_INPUTS(search_steps="1, 2", search_reference_steps=4) is True
    assert "[0, 3]" in M.AdaSpaSparseAttentionV1.VALIDATE_INPUTS(search_steps="1, 9", search_reference_steps=4)
