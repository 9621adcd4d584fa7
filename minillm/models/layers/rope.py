"""Rotary position embeddings (RoPE, Su et al. 2021).

Notable choices:
- The "rotate half" layout of transformers (and of Llama 3 / Qwen3-Next checkpoints): dimension `i` is paired with
  `i + rot/2`, and `cos`/`sin` are `cat(freqs, freqs)`. DeepSeek-V3 pairs adjacent dimensions `(2i, 2i+1)` instead;
  `apply_rotary(..., interleaved=True)` implements that layout from the same `cos`/`sin`.
- Partial rotary: `cos`/`sin` may cover only the first `rotary_dim` channels of each head (Qwen3-Next rotates 25%);
  the rest pass through unchanged.
- Angles come from `position_ids` (not from a running offset), so packed rows whose positions restart at 0 for each
  document, left-padded batches and KV-cached decoding all get the right rotation without special cases.
- The table is recomputed per forward from `inv_freq` in fp32 (cheap: one outer product per batch, shared by all
  layers), exactly as transformers does, so our numbers are bit-identical to the references.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# RoPE variants whose frequencies transformers recomputes from the positions of each forward (NTK "dynamic"
# scaling; "longrope" switching to its long factors past the original length). minillm computes its tables once.
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


def default_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies `theta^(-2i/rotary_dim)` for i in [0, rotary_dim/2)."""
    # Explicit CPU device: the table must be real even when the model is built under a meta-device context.
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device="cpu") / rotary_dim))


class RotaryEmbedding(nn.Module):
    """Computes the `cos`/`sin` tables for given positions; one instance per model, shared by all layers.

    Args:
        rotary_dim: number of rotated channels per head (`head_dim` or less for partial rotary).
        theta: the RoPE base (`rope_theta`).
        inv_freq: precomputed inverse frequencies (for scaled RoPE variants); default `theta^(-2i/rotary_dim)`.
        attention_scaling: factor applied to cos and sin (1.0 except for some scaled variants such as YaRN).
    """

    def __init__(
        self,
        rotary_dim: int,
        theta: float = 10000.0,
        inv_freq: torch.Tensor | None = None,
        attention_scaling: float = 1.0,
    ) -> None:
        super().__init__()
        if rotary_dim % 2:
            raise ValueError(f"rotary dimension must be even, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.attention_scaling = attention_scaling
        if inv_freq is None:
            inv_freq = default_inv_freq(rotary_dim, theta)
        # Non-persistent (never saved); `initial_inv_freq` keeps the values so weight init can restore the buffer
        # after transformers loads a model through the meta device.
        self.initial_inv_freq = inv_freq.detach().float().cpu()
        self.register_buffer("inv_freq", self.initial_inv_freq.clone(), persistent=False)

    @classmethod
    def from_config(cls, config: Any, rotary_dim: int, head_dim: int | None = None) -> RotaryEmbedding:
        """Build from a transformers-style config holding `rope_parameters` (`rope_theta`, `rope_type`).

        `rope_type == "default"` is computed here; any other type (`linear`, `yarn`, `llama3`, ...) is delegated to
        transformers' own `ROPE_INIT_FUNCTIONS`, which read the same config fields as the reference models.
        `head_dim`: the value the reference's config gives its `head_dim` field where ours has none (DeepSeek-V3's
        is `qk_rope_head_dim`); those functions size the tables by it, else by hidden_size / num_attention_heads.
        """
        params = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = params.get("rope_type", "default")
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        if rope_type == "default":
            return cls(rotary_dim, theta)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported: its tables change with the sequence length, which minillm's "
                f"fixed tables do not; supported: default, "
                f"{', '.join(t for t in ROPE_INIT_FUNCTIONS if t not in LENGTH_DEPENDENT_ROPE_TYPES)}"
            )
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"unknown rope_type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}"
            )
        if head_dim is not None:
            config = _WithHeadDim(config, head_dim)
        # Under an explicit CPU default device: `from_pretrained` builds the model inside a meta-device context,
        # and these functions create some of their tensors without a device, which would then hold no data.
        with torch.device("cpu"):
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        if inv_freq.numel() * 2 != rotary_dim:
            raise ValueError(
                f"rope_type {rope_type!r} gave {inv_freq.numel() * 2} rotary channels, expected {rotary_dim}"
            )
        return cls(rotary_dim, theta, inv_freq=inv_freq, attention_scaling=scaling)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(cos, sin)`, each (B, L, rotary_dim) in `x.dtype`, for `position_ids` (B, L)."""
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        freqs = position_ids[..., None].float() * inv_freq  # (B, L, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, rot)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, theta={self.theta}"


class _WithHeadDim:
    """A config read through, with `head_dim` set (see `RotaryEmbedding.from_config`)."""

    def __init__(self, config: Any, head_dim: int) -> None:
        self._config = config
        self.head_dim = head_dim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of x (B, H, L, D); cos/sin are (B, 1, L, rot)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        # Adjacent pairs (x0, x1), (x2, x3), ... each rotated by one frequency; cos/sin = cat(f, f) so the first half
        # holds one angle per pair. Like transformers' DeepSeek-V3, the output is de-interleaved (all first members,
        # then all second members): q and k get the same permutation, so q.k is unchanged.
        c, s = cos[..., : rot // 2], sin[..., : rot // 2]
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    else:
        out = (x_rot * cos) + (rotate_half(x_rot) * sin)
    if x_pass.shape[-1] == 0:
        return out
    return torch.cat((out, x_pass), dim=-1)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, Hq, L, D) and keys (B, Hk, L, D) by the angles of their positions.

    `cos`/`sin` (B, L, rot) come from `RotaryEmbedding(x, position_ids)`; when `rot < D` only the first `rot`
    channels are rotated (partial rotary).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, L, rot): broadcast over heads
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
