"""A synthetic, video-like self-attention workload for measuring sparse attention without model weights.

It imitates what a video diffusion transformer (Wan-like) feeds its self-attention:

* a 3-D latent grid (frames x height x width) in frame-major token order;
* content made of several "objects" (soft blobs, each with its own feature vector) moving smoothly over
  the frames in front of a slowly panning background, plus a little texture;
* a sampler step: the hidden features are a mix of that content and a fixed noise sample, with the noise
  share falling over the steps, so q/k drift smoothly from one step to the next (what warm-started
  clustering relies on);
* per layer and head: q/k/v from random projections of the features, plus a constant "positional" part
  that, once rotated by 3-D RoPE (head dim split into time/height/width parts as Wan does), makes
  attention depend on relative position;
* layer kinds from position-dominated (local, temporal) through mixed and semantic to diffuse, with
  per-head variation of the gains and of the time/space balance;
* optionally a text segment (joint text+video attention) with a padding mask.

Everything is deterministic from ``WorkloadConfig.seed``. It is a stand-in for a real model, not a
model: numbers measured on it show direction, not final quality.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Base gains per layer kind: (positional logit at zero offset, semantic logit scale, share of the
# positional energy on the time axis, spread of the per-token gain). Logit scales are in units of
# q.k / sqrt(d). The per-token key gain is log-normal: a few keys stand out, so key clouds have outliers
# and layers differ in how compact their keys are.
LAYER_KINDS = {
    "local": (20.0, 3.0, 0.35, 0.25),  # neighbourhood in space and time
    "temporal": (16.0, 3.0, 0.0, 0.25),  # same place in other frames (energy on the height/width parts only)
    "mixed": (11.0, 9.0, 0.35, 0.4),
    "semantic": (3.0, 14.0, 0.35, 0.5),  # same object anywhere in the clip
    "diffuse": (2.0, 3.0, 0.35, 0.35),  # close to uniform: hard to sparsify
}
# Order in which layer kinds are assigned to layers (cycled); the first layers of real models are
# mostly positional, the diffuse layers are few.
KIND_CYCLE = ("local", "semantic", "mixed", "temporal", "diffuse", "semantic", "local", "mixed")


@dataclass(frozen=True)
class WorkloadConfig:
    frames: int = 8
    height: int = 24
    width: int = 40
    heads: int = 4
    head_dim: int = 128
    layers: int = 6
    steps: int = 6
    objects: int = 6
    feature_dim: int = 192
    batch: int = 1  # batch elements (e.g. conditional and unconditional branch); each has its own noise
    text_len: int = 0  # >0 adds a text segment for joint attention
    text_first: bool = False  # text before video (CogVideoX) or after it (HunyuanVideo)
    text_padding: int = 0  # trailing text tokens that are padding (masked out as keys)
    rope_theta: float = 10000.0
    seed: int = 0

    def validate(self) -> "WorkloadConfig":
        ranges = {
            "frames": (1, 256), "height": (1, 512), "width": (1, 512), "heads": (1, 128),
            "layers": (1, 256), "steps": (1, 1000), "objects": (0, 64), "feature_dim": (8, 4096),
            "batch": (1, 16), "text_len": (0, 4096), "text_padding": (0, 4096), "seed": (0, 2**62),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"WorkloadConfig.{name} = {value!r} is out of range: expected an integer "
                                 f"in [{low}, {high}]")
        if self.head_dim not in (64, 128):
            raise ValueError(f"WorkloadConfig.head_dim = {self.head_dim!r} is not supported: expected 64 or 128")
        if self.text_padding > self.text_len:
            raise ValueError(f"WorkloadConfig.text_padding = {self.text_padding} must be <= text_len = "
                             f"{self.text_len}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            raise ValueError(f"WorkloadConfig.rope_theta = {self.rope_theta!r} must be a number > 1")
        return self

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def tokens(self) -> int:
        return self.video_tokens + self.text_len


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Dimensions of the (time, height, width) parts of the head dim, as Wan splits them."""
    part = 2 * (head_dim // 6)
    return head_dim - 2 * part, part, part


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(N, head_dim // 2) rotation angle of every (interleaved) pair, from (N, 3) integer positions."""
    angles = []
    for axis, dim in enumerate(rope_split(head_dim)):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(positions[:, axis:axis + 1].double() * freqs)
    return torch.cat(angles, dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x0, x1), (x2, x3), ... of the last dim by ``angles`` (N, d/2)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).reshape(x.shape)


def sigma_schedule(steps: int, shift: float = 5.0) -> list[float]:
    """Flow-matching sigmas with Wan's time shift, from 1 down (one per step, last step excluded 0)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return [float(shift * x / (1 + (shift - 1) * x)) for x in t]


class VideoAttentionWorkload:
    """Deterministic q/k/v for every (layer, step) of a synthetic video diffusion run.

    ``qkv(layer, step)`` returns q, k, v shaped (batch, heads, tokens, head_dim) float32, with RoPE
    applied to the video part of q and k. ``call_kwargs()`` gives the text segment description
    (text_len, text_first, mask) in the form the attention runner takes.
    """

    def __init__(self, config: WorkloadConfig = WorkloadConfig()):
        self.config = config.validate()
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        self.sigmas = sigma_schedule(cfg.steps)
        self.positions = self._grid_positions()
        self.angles = rope_angles(self.positions, cfg.head_dim, cfg.rope_theta).float()
        self.object_features = torch.randn(max(cfg.objects, 1), cfg.feature_dim, generator=gen)
        self.object_membership = self._object_membership(gen)  # (objects + 1, N): last row = background
        content = self._content_features(gen)
        noise = torch.randn(cfg.batch, cfg.video_tokens, cfg.feature_dim, generator=gen)
        # Branches differ by their noise sample and a small content perturbation.
        branch_content = [content + 0.15 * b * torch.randn(content.shape, generator=gen) for b in range(cfg.batch)]
        self._content = torch.stack(branch_content)  # (B, N, F)
        self._noise = noise
        self._text = self._text_features(gen)  # (B, T, F) or None
        self.layer_kinds = [KIND_CYCLE[i % len(KIND_CYCLE)] for i in range(cfg.layers)]
        self._layers = [self._layer_parameters(kind, gen) for kind in self.layer_kinds]

    # ------------------------------------------------------------------------------------- public
    @property
    def video_tokens(self) -> int:
        return self.config.video_tokens

    @property
    def tokens(self) -> int:
        return self.config.tokens

    def features(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(content, noise) parts of the video tokens' hidden features at a sampler step, each (B, N, F).

        Their sum has unit RMS per token. Hidden states keep much of the content even at high noise
        (the model predicts it), and the noise share falls smoothly over the steps."""
        self._check_step(step)
        sigma = self.sigmas[step]
        content = (1.0 - 0.55 * sigma) * self._content
        noise = 0.55 * sigma * self._noise
        rms = (content + noise).pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
        return content / rms, noise / rms

    def qkv(self, layer: int, step: int, dtype: torch.dtype = torch.float32):
        """q, k, v (B, H, tokens, d) of one self-attention call; text (if any) placed as configured."""
        cfg = self.config
        if not 0 <= layer < cfg.layers:
            raise ValueError(f"layer = {layer} is out of range: expected an integer in [0, {cfg.layers - 1}]")
        params = self._layers[layer]
        content, noise = self.features(step)  # (B, N, F) each
        project = lambda x, w: torch.einsum("bnf,hfd->bhnd", x, w)  # noqa: E731
        # Noise reaches q and k through unrelated projections: it blurs attention instead of making
        # every token attend to itself.
        q = project(content, params["wq"]) + project(noise, params["wq_noise"]) + params["cq"].unsqueeze(1)
        k = (project(content, params["wk"]) + project(noise, params["wk_noise"]) + params["ck"].unsqueeze(1)
             + params["k_bias"].unsqueeze(1) + params["key_detail"])
        v = project(content + noise, params["wv"])
        q, k = apply_rope(q, self.angles), apply_rope(k, self.angles)
        if self._text is not None:
            tq = torch.einsum("btf,hfd->bhtd", self._text, params["wq"])
            tk = torch.einsum("btf,hfd->bhtd", self._text, params["wk"])
            tv = torch.einsum("btf,hfd->bhtd", self._text, params["wv"])
            join = (lambda t, x: torch.cat([t, x], dim=2)) if cfg.text_first else (lambda t, x: torch.cat([x, t], dim=2))
            q, k, v = join(tq, q), join(tk, k), join(tv, v)
        return q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()

    def key_mask(self) -> Optional[torch.Tensor]:
        """Bool (B, 1, 1, tokens) mask over keys (True = attend) when text padding is present, else None."""
        cfg = self.config
        if cfg.text_padding == 0:
            return None
        keep = torch.ones(cfg.batch, 1, 1, cfg.tokens, dtype=torch.bool)
        text_start = 0 if cfg.text_first else cfg.video_tokens
        pad_start = text_start + cfg.text_len - cfg.text_padding
        keep[..., pad_start:text_start + cfg.text_len] = False
        return keep

    def call_kwargs(self) -> dict:
        """Text segment description for the attention runner's call info."""
        return {"text_len": self.config.text_len, "text_first": self.config.text_first, "mask": self.key_mask()}

    def describe(self) -> str:
        cfg = self.config
        text = f", text {cfg.text_len} tokens ({'first' if cfg.text_first else 'last'})" if cfg.text_len else ""
        return (f"{cfg.frames}x{cfg.height}x{cfg.width} latent grid = {cfg.video_tokens} video tokens{text}, "
                f"{cfg.heads} heads x {cfg.head_dim}, {cfg.layers} layers ({', '.join(self.layer_kinds)}), "
                f"{cfg.steps} steps, {cfg.objects} objects, seed {cfg.seed}")

    def to(self, device) -> "VideoAttentionWorkload":
        """Moves every tensor the workload computes q/k/v from to ``device`` (in place; returns self), so
        large grids are generated where they are used. The values stay the same."""
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        for name in ("angles", "_content", "_noise", "_text"):
            setattr(self, name, move(getattr(self, name)))
        self._layers = [{key: move(value) for key, value in params.items()} for params in self._layers]
        return self

    # ----------------------------------------------------------------------------------- building
    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.config.steps:
            raise ValueError(f"step = {step} is out of range: expected an integer in [0, {self.config.steps - 1}]")

    def _grid_positions(self) -> torch.Tensor:
        cfg = self.config
        t, y, x = torch.meshgrid(torch.arange(cfg.frames), torch.arange(cfg.height), torch.arange(cfg.width),
                                 indexing="ij")
        return torch.stack([t.flatten(), y.flatten(), x.flatten()], dim=-1)  # frame-major order

    def _object_membership(self, gen: torch.Generator) -> torch.Tensor:
        """Soft, occluding membership of every token in each object (front to back) and the background."""
        cfg = self.config
        pos = self.positions.double()
        t, y, x = pos[:, 0], pos[:, 1], pos[:, 2]
        uniform = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
        visible = torch.ones(cfg.video_tokens, dtype=torch.float64)
        weights = []
        for _ in range(cfg.objects):
            cy0, cx0 = uniform(1) * cfg.height, uniform(1) * cfg.width
            # Latent tokens move ~0-1.5 cells per frame, with a gentle wobble.
            vy, vx = (uniform(1) - 0.5) * 1.5, (uniform(1) - 0.5) * 3.0
            phase = uniform(1) * 2 * math.pi
            ry = 2.0 + uniform(1) * max(cfg.height / 5, 1.0)
            rx = 2.0 + uniform(1) * max(cfg.width / 5, 1.0)
            cy = cy0 + vy * t + 0.8 * torch.sin(0.7 * t + phase)
            cx = cx0 + vx * t + 0.8 * torch.cos(0.5 * t + phase)
            dist2 = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
            shape = torch.exp(-dist2 ** 2)  # flat inside, soft edge
            weights.append(shape * visible)
            visible = visible * (1 - shape)
        weights.append(visible)  # background
        return torch.stack(weights).float()

    def _content_features(self, gen: torch.Generator) -> torch.Tensor:
        """(N, F) clean features: objects + panning background regions + smooth texture."""
        cfg = self.config
        f = cfg.feature_dim
        pos = self.positions.float()
        t, y, x = pos[:, 0], pos[:, 1], pos[:, 2]
        # Background: 4 region prototypes blended by smooth maps over a camera that pans slowly.
        n_regions = 4
        prototypes = torch.randn(n_regions, f, generator=gen)
        pan = 0.6 * t
        freqs = torch.rand(n_regions, 2, generator=gen) * 0.25 + 0.05
        phases = torch.rand(n_regions, generator=gen) * 2 * math.pi
        logits = torch.stack([3.0 * torch.sin(freqs[r, 0] * y + freqs[r, 1] * (x + pan) + phases[r])
                              for r in range(n_regions)], dim=-1)
        background = torch.softmax(logits, dim=-1) @ prototypes
        # Texture: a smooth random field over (y, x + pan), so it moves with the camera.
        texture_basis = torch.randn(8, f, generator=gen)
        tex_freqs = torch.randn(8, 2, generator=gen) * 0.6
        tex_phase = torch.rand(8, generator=gen) * 2 * math.pi
        texture = torch.stack([torch.cos(tex_freqs[i, 0] * y + tex_freqs[i, 1] * (x + pan) + tex_phase[i])
                               for i in range(8)], dim=-1) @ texture_basis / math.sqrt(8)
        member = self.object_membership
        objects = member[:-1].T @ self.object_features[:cfg.objects] if cfg.objects else 0.0
        return objects + member[-1:].T * background + 0.35 * texture

    def _text_features(self, gen: torch.Generator) -> Optional[torch.Tensor]:
        cfg = self.config
        if cfg.text_len == 0:
            return None
        # Prompt words mostly refer to the objects.
        refer = torch.randint(0, max(cfg.objects, 1), (cfg.text_len,), generator=gen)
        words = 0.7 * self.object_features[refer] + 0.7 * torch.randn(cfg.text_len, cfg.feature_dim, generator=gen)
        words = words / words.pow(2).mean(-1, keepdim=True).sqrt()
        return words.unsqueeze(0).expand(cfg.batch, -1, -1).contiguous()

    def _layer_parameters(self, kind: str, gen: torch.Generator) -> dict:
        """Projections and positional vectors of one layer; every head varies around the layer kind."""
        cfg = self.config
        h, d, f = cfg.heads, cfg.head_dim, cfg.feature_dim
        pos_logit, sem_logit, time_share, gain_spread = LAYER_KINDS[kind]
        jitter = lambda: torch.exp(0.35 * torch.randn(h, generator=gen))  # noqa: E731
        pos_gain, sem_gain = pos_logit * jitter(), sem_logit * jitter()
        time_share = (time_share + 0.25 * (torch.rand(h, generator=gen) - 0.5)).clamp(0.0, 0.8)
        if kind == "temporal":
            time_share = torch.zeros(h)
        dt, dh, dw = rope_split(d)
        pair_index = torch.cat([torch.arange(p // 2) / max(p // 2 - 1, 1) for p in (dt, dh, dw)])  # 0 high freq .. 1 low
        axis = torch.cat([torch.full((p // 2,), a) for a, p in enumerate((dt, dh, dw))])
        # Positional vector: energy on high and middle frequencies (sharp neighbourhoods), per-head time share.
        pos_energy = (1.0 - 0.95 * pair_index).pow(2).unsqueeze(0).expand(h, -1).clone()
        axis_share = torch.where(axis == 0, time_share.unsqueeze(-1), (1 - time_share.unsqueeze(-1)) / 2)
        pos_energy = pos_energy * axis_share
        pos_energy = pos_energy / pos_energy.sum(-1, keepdim=True)
        # |c|^2 / sqrt(d) = positional logit at zero offset; split each pair's energy over its two dims.
        pair_norm = (pos_energy * pos_gain.unsqueeze(-1) * math.sqrt(d)).sqrt()
        angle = torch.rand(h, d // 2, generator=gen) * 2 * math.pi
        c = torch.stack([pair_norm * torch.cos(angle), pair_norm * torch.sin(angle)], dim=-1).reshape(h, d)
        # Semantic projections: more weight on low RoPE frequencies, where relative position matters least.
        sem_profile = (0.3 + 0.7 * pair_index).repeat_interleave(2)
        base = torch.randn(h, f, d, generator=gen) * sem_profile
        # x has unit RMS, so q.k / sqrt(d) of a token with itself is about sem_gain.
        scale = (sem_gain * math.sqrt(d)).sqrt().view(h, 1, 1) / math.sqrt(f * d * sem_profile.pow(2).mean())
        wq = base * scale
        wk = (base + 0.4 * torch.randn(h, f, d, generator=gen) * sem_profile) * scale / math.sqrt(1.16)
        wv = torch.randn(h, f, d, generator=gen) / math.sqrt(f)
        k_bias = 0.5 * torch.randn(h, d, generator=gen)  # projection bias of the keys (rotated by RoPE like the rest)
        wq_noise = torch.randn(h, f, d, generator=gen) * sem_profile * scale
        wk_noise = torch.randn(h, f, d, generator=gen) * sem_profile * scale
        # Key detail: a per-token component no query is built to match, with a heavy-tailed size, so a few
        # keys lie far from any cluster (what the adaptive key clustering has to absorb).
        z = torch.randn(cfg.video_tokens, generator=gen)
        token_gain = torch.exp(gain_spread * z - gain_spread ** 2 / 2).view(1, -1, 1)
        detail = torch.randn(cfg.video_tokens, f, generator=gen) @ torch.randn(h, f, d, generator=gen)
        detail = 0.5 * token_gain * detail * sem_profile * scale.view(h, 1, 1)
        return {"wq": wq, "wk": wk, "wv": wv, "wq_noise": wq_noise, "wk_noise": wk_noise,
                "cq": c, "ck": c.clone(), "k_bias": k_bias, "key_detail": detail.unsqueeze(0)}
