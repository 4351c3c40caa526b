"""Test-only ComfyUI nodes, installed into a temporary custom_nodes folder by the integration fixture.

* AdaClusterTestConditioning: seeded random text embeddings (and the pooled vector HunyuanVideo needs),
  so no text encoder is required.
* AdaClusterTestInterrupt: a model clone that asks ComfyUI to interrupt the run after N model calls.
* AdaClusterTestOverride: installs another attention override (logs once, then runs the backend), to
  check that AdaCluster chains to it.
* AdaClusterTestProbe: the status of every AdaCluster patch alive in the server (run active, cache bytes).
"""
import gc
import json
import sys

import torch


class AdaClusterTestConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31}),
            "tokens": ("INT", {"default": 24, "min": 1, "max": 1024}),
            "width": ("INT", {"default": 4096, "min": 1, "max": 8192}),
            "pooled": ("BOOLEAN", {"default": False}),
            "padded_tokens": ("INT", {"default": 0, "min": 0, "max": 1024}),
        }}

    def make(self, seed, tokens, width, pooled, padded_tokens):
        gen = torch.Generator().manual_seed(seed)
        extra = {}
        if pooled:
            extra["pooled_output"] = torch.randn(1, 768, generator=gen)
        if padded_tokens:
            mask = torch.ones(1, tokens, dtype=torch.long)
            mask[:, tokens - padded_tokens:] = 0
            extra["attention_mask"] = mask
        return ([[torch.randn(1, tokens, width, generator=gen), extra]],)


class AdaClusterTestInterrupt:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "after_calls": ("INT", {"default": 2, "min": 1, "max": 1000})}}

    def patch(self, model, after_calls):
        import comfy.model_management
        import comfy.patcher_extension

        calls = {"n": 0}

        def wrapper(executor, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == after_calls:
                comfy.model_management.interrupt_current_processing(True)
            return executor(*args, **kwargs)

        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "adacluster_test_interrupt",
                                     wrapper)
        return (patched,)


class AdaClusterTestOverride:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        import logging

        seen = set()

        def override(func, *args, **kwargs):
            if "called" not in seen:
                seen.add("called")
                logging.info("adacluster-test-override: called")
            return func(*args, **kwargs)

        patched = model.clone()
        patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        return (patched,)


class AdaClusterTestProbe:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})}}

    @classmethod
    def IS_CHANGED(cls, nonce):
        return float("nan")

    def probe(self, nonce):
        gc.collect()
        patches = []
        for name, module in list(sys.modules.items()):
            if name.endswith(".adacluster_core.comfy_adapter") and hasattr(module, "live_patches"):
                patches += [p.status() for p in module.live_patches()]
        return {"ui": {"adacluster_status": [json.dumps(patches)]}}


NODE_CLASS_MAPPINGS = {
    "AdaClusterTestConditioning": AdaClusterTestConditioning,
    "AdaClusterTestInterrupt": AdaClusterTestInterrupt,
    "AdaClusterTestOverride": AdaClusterTestOverride,
    "AdaClusterTestProbe": AdaClusterTestProbe,
}
