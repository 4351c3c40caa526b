"""Builds tiny random-weight checkpoints of Wan 2.1, HunyuanVideo and CogVideoX with the real key names.

Run with ComfyUI's python from inside a ComfyUI checkout (the test fixture does this):

    cd $COMFYUI_PATH && $COMFYUI_PYTHON /path/to/build_tiny_checkpoints.py OUT_DIR [family ...]

The models are instantiated from the tree's own model classes, so the key names are exactly what ComfyUI's
model detection expects. The detector fixes the head dim (128 for Wan and HunyuanVideo, 64 for CogVideoX)
and the text width (4096); everything else is made as small as possible. Weights are seeded random values
(norm scales near 1), so attention has real structure to cluster, not zeros.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
_ARGS, sys.argv = sys.argv, sys.argv[:1] + ["--cpu"]  # ComfyUI reads its own command line on import

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.ops  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OPS = comfy.ops.disable_weight_init


def _randomise(module: torch.nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in module.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if tensor.ndim == 1 and ("norm" in name or leaf == "scale") and leaf in ("weight", "scale"):
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=gen)
        elif tensor.ndim == 1:
            value = 0.02 * torch.randn(tensor.shape, generator=gen)
        else:
            fan_in = max(1, tensor[0].numel())
            value = torch.randn(tensor.shape, generator=gen) / fan_in ** 0.5
        state[name] = value.to(torch.float32).contiguous()
    return state


def build_wan(seed: int) -> dict:
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=256, ffn_dim=384,
                     freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=3, operations=OPS,
                     device="cpu", dtype=torch.float32)
    return _randomise(model, seed)


def build_hunyuan_video(seed: int) -> dict:
    from comfy.ldm.hunyuan_video import model as hv

    names = {f.name for f in dataclasses.fields(hv.HunyuanVideoParams)}
    params = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=256, mlp_ratio=4.0,
                  num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2],
                  qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False,
                  vision_in_dim=None, meanflow_sum=False)
    model = hv.HunyuanVideo(operations=OPS, device="cpu", dtype=torch.float32,
                            **{k: v for k, v in params.items() if k in names})
    return _randomise(model, seed)


def build_cogvideox(seed: int) -> dict:
    from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
                                        time_embed_dim=64, text_embed_dim=4096, num_layers=3, patch_size=2,
                                        use_rotary_positional_embeddings=True, operations=OPS, device="cpu",
                                        dtype=torch.float32)
    return _randomise(model, seed)


BUILDERS = {
    "wan": [("tiny_wan21_t2v.safetensors", build_wan, 1),
            ("tiny_wan22_high_noise.safetensors", build_wan, 2),
            ("tiny_wan22_low_noise.safetensors", build_wan, 3)],
    "hunyuan_video": [("tiny_hunyuan_video_t2v.safetensors", build_hunyuan_video, 4)],
    "cogvideox": [("tiny_cogvideox_t2v.safetensors", build_cogvideox, 5)],
}


def main(argv):
    out_dir = argv[1]
    families = argv[2:] or list(BUILDERS)
    os.makedirs(out_dir, exist_ok=True)
    for family in families:
        for file_name, build, seed in BUILDERS[family]:
            path = os.path.join(out_dir, file_name)
            if not os.path.exists(path):
                save_file(build(seed), path)
            print(path)


if __name__ == "__main__":
    main(_ARGS)
