"""Configuration errors name the value and the range; presets load; the step follows the sigmas."""
import pytest

from comfyui_adacluster.adacluster_core.config import (ConfigError, MODEL_FAMILIES, SELECTION_RECIPES,
                                                      AdaClusterConfig, SelectionConfig, from_dict, load_preset,
                                                      to_dict)
from comfyui_adacluster.adacluster_core.schedule import Phase, noise_progress, phase_of, step_from_sigmas


@pytest.mark.parametrize("values,message", [
    ({"query_clusters": -3}, r"query_clusters = -3 .*\[1, 4096\]"),
    ({"initial_key_clusters": 0}, r"initial_key_clusters = 0 .*\[1, 4096\]"),
    ({"sparsity_threshold": 0.0}, r"sparsity_threshold = 0.0 .*\(0.0, inf\]"),
    ({"sparsity_threshold": -1}, r"sparsity_threshold = -1"),
    ({"dense_layer_fraction": 1.5}, r"dense_layer_fraction = 1.5 .*\[0.0, 1.0\]"),
    ({"warmup_steps": 2.5}, r"warmup_steps must be an integer"),
    ({"recipe": "fast"}, r"recipe = 'fast' is not one of"),
    ({"selection.top_p": 0}, r"selection.top_p = 0 "),
    ({"selection.score": "magic"}, r"selection.score = 'magic'"),
    ({"not_a_setting": 1}, r"unknown setting 'not_a_setting'"),
])
def test_bad_values_name_the_value_and_range(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(values)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match=r"query_clusters = 0 .*\[1, 4096\]"):
        AdaClusterConfig(query_clusters=0)
    with pytest.raises(ConfigError, match=r"selection.top_p = 1.5"):
        SelectionConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="selection must be a SelectionConfig"):
        AdaClusterConfig(selection={"top_k": 3})
    import dataclasses

    with pytest.raises(ConfigError, match="warmup_steps = -1"):
        dataclasses.replace(AdaClusterConfig(), warmup_steps=-1)
    # A Top-K above the clusters a layer can have is accepted: it keeps every cluster.
    assert from_dict({"recipe": "paper", "initial_key_clusters": 4, "max_stages": 2,
                      "selection.top_k": 9}).selection.top_k == 9


def test_unknown_preset_is_an_error_and_presets_load():
    with pytest.raises(ConfigError, match="preset = 'flux'"):
        load_preset("flux")
    for family in MODEL_FAMILIES:
        config = load_preset(family, warmup_steps=3)
        assert config.warmup_steps == 3 and config.query_clusters == 130


def test_round_trip_and_recipes():
    config = AdaClusterConfig()
    assert from_dict(to_dict(config)) == config
    paper = config.replace(recipe="paper")
    assert paper.selection == SELECTION_RECIPES["paper"] and paper.selection.score == "quest"
    assert config.replace(**{"selection.top_k": 7}).selection.top_k == 7
    with pytest.raises(ConfigError):
        config.replace(query_clusters=0)


def test_step_from_sigmas_handles_two_calls_per_step():
    schedule = [14.6, 9.0, 5.0, 2.0, 0.6, 0.0]
    assert [step_from_sigmas(s, schedule) for s in schedule[:-1]] == [0, 1, 2, 3, 4]
    # Heun-like second evaluations land between schedule points and belong to the step that started above
    assert [step_from_sigmas(s, schedule) for s in (11.0, 6.5, 3.0, 1.2, 0.2)] == [0, 1, 2, 3, 4]
    assert step_from_sigmas(9.0 * (1 + 1e-7), schedule) == 1  # float noise on a schedule point


def test_phase_of_step():
    assert [phase_of(s, 3) for s in range(4)] == [Phase.WARMUP, Phase.WARMUP, Phase.CALIBRATE, Phase.SPARSE]
    assert phase_of(0, 0) is Phase.SPARSE


def test_budget_schedule_scales_top_k_by_noise_phase():
    sel = SelectionConfig(high_noise_top_k_scale=2.0, low_noise_top_k_scale=0.5, noise_phase_fraction=0.25)
    scales = [sel.top_k_scale(step, 20) for step in range(20)]
    assert scales == [2.0] * 5 + [1.0] * 10 + [0.5] * 5
    assert all(SELECTION_RECIPES[name].top_k_scale(0, 50) == 1.0 for name in ("paper", "svg2"))
    # by noise level where the run knows it: a run over the second half of a schedule has no high-noise steps
    assert [sel.top_k_scale(step, 10, 0.5 + step / 20) for step in range(10)] == [1.0] * 5 + [0.5] * 5
    with pytest.raises(ConfigError, match=r"selection.high_noise_top_k_scale = 0 .*\(0.0, 16.0\]"):
        from_dict({"selection.high_noise_top_k_scale": 0})
    with pytest.raises(ConfigError, match=r"selection.noise_phase_fraction = 0.6 .*\[0.0, 0.5\]"):
        from_dict({"selection.noise_phase_fraction": 0.6})


def flow_percent_to_sigma(shift):
    """Shifted flow matching (Wan, HunyuanVideo in ComfyUI): sigma at denoising percent p."""
    return lambda p: 1.0 if p <= 0 else 0.0 if p >= 1 else shift * (1 - p) / (1 + (shift - 1) * (1 - p))


def simple_schedule(shift, steps, start=0, end=None):
    """ComfyUI's 'simple' scheduler over 1000 timesteps, optionally cut to steps [start, end) as
    KSamplerAdvanced does."""
    table = [flow_percent_to_sigma(shift)(1 - t / 1000) for t in range(1, 1001)]
    sigmas = [table[-(1 + int(x * 1000 / steps))] for x in range(steps)] + [0.0]
    return sigmas[start:(steps if end is None else end) + 1]


def test_noise_progress_is_the_step_share_of_a_whole_run_and_the_covered_part_of_a_cut_one():
    percent_to_sigma = flow_percent_to_sigma(8.0)
    whole = noise_progress(percent_to_sigma, simple_schedule(8.0, 50))
    assert whole == pytest.approx([i / 50 for i in range(50)], abs=1e-6)
    second_half = noise_progress(percent_to_sigma, simple_schedule(8.0, 20, start=10))
    assert second_half == pytest.approx([0.5 + i / 20 for i in range(10)], abs=1e-6)
    sel = SelectionConfig()
    assert {sel.top_k_scale(i, 10, p) for i, p in enumerate(second_half)} == {1.0}  # no high-noise steps
    first_half = noise_progress(percent_to_sigma, simple_schedule(8.0, 20, end=10))
    high = sel.high_noise_top_k_scale
    assert high > 1 and [sel.top_k_scale(i, 10, p) for i, p in enumerate(first_half)] == [high] * 5 + [1.0] * 5


def test_command_line_settings_are_parsed_and_checked():
    from comfyui_adacluster.adacluster_core.config import parse_settings
    assert parse_settings(["query_clusters=130", "selection.top_k=24", "selection.tail=false",
                           "recipe=paper", "sparsity_threshold=1.25"]) == {
        "query_clusters": 130, "selection.top_k": 24, "selection.tail": False, "recipe": "paper",
        "sparsity_threshold": 1.25}
    for bad, message in ((["query_clusters=0"], r"query_clusters = 0 is out of range"),
                         (["no_such=1"], "unknown setting 'no_such'"), (["top_k"], "expected KEY=VALUE"),
                         (["selection.top_k=many"], "selection.top_k must be an integer")):
        with pytest.raises(ConfigError, match=message):
            parse_settings(bad)
