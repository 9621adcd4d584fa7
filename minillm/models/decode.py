"""The decode fast path shared by the three models: static caches written in place, RoPE by table lookup.

`model.generate()` and training run the ordinary `forward`. Our decode loop (`minillm.inference.engine.Engine`)
prefills with that same forward, then hands the cache it got back to `model.begin_decode(cache, max_len, mask)` and
calls `model.decode_step(input_ids, position_ids, state)` once per token. At the tiny sizes people start with (and
on CPU generally) a decode step is dominated by the number of small tensor ops and the Python around them, not by
FLOPs, so the fast path does the same math with far fewer of both:

- `StaticKV`: each attention layer's keys and values live in one buffer preallocated for the whole decode
  (B, Hk, S_max, Dh); a step writes its token in place and attends to a view of the filled prefix: no `torch.cat`
  of the whole cache per layer per step, no `DynamicCache` bookkeeping.
- `RopeTable`: `cos`/`sin` for every position of the decode computed once by the model's own `RotaryEmbedding`
  (the same formula, so the same numbers); a step gathers its rows by position.
- `DecodeState.mask`: the padding mask (B, 1, 1, S_max) as booleans, built once and sliced per step; None when no
  row is padded (a single query then needs no mask at all).
- Per-session weights (`DecodeState.weights`): anything a step would otherwise rebuild every call (the regrouped
  DeltaNet input projection, `1 + w` of zero-centred norms) is made once per decode.
- RMSNorm is one `F.rms_norm` call; modules are not called through `nn.Module.__call__` (no hook dispatch); q and k
  are rotated together; MoE layers with small experts gather the few chosen experts' weights instead of sorting
  tokens by expert; the step returns the last logits (B, V) directly instead of building a `ModelOutput`.

The fast path is exercised by `Engine` and tested against the ordinary cached forward (`tests/test_decode_fast_path.py`:
logits within 1e-5 of their scale, identical greedy tokens, left-padded batches included; Llama's are bit-identical,
the others sum a few float32 terms in another order). It is inference-only (`torch.no_grad`), never writes a weight,
and copies the prefill's cache, so `forward`, `generate()` and the models' `Cache` classes are untouched by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minillm.models.layers import linear as dense
from minillm.models.layers.norm import RMSNorm
from minillm.models.layers.rope import RotaryEmbedding


class StaticKV:
    """Keys and values of one attention layer, preallocated for the whole decode and written in place.

    Holds (B, Hk, S_max, Dk) keys and (B, Hk, S_max, Dv) values; `append` writes position `n` and returns views of
    positions [0, n] (strided views of the buffers: no copy of the past per step).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, max_len: int) -> None:
        bsz, heads, filled, _ = keys.shape  # the prefill's (B, Hk, T, Dk)
        self.keys = keys.new_empty(bsz, heads, max_len, keys.shape[-1])
        self.values = values.new_empty(bsz, values.shape[1], max_len, values.shape[-1])
        self.keys[:, :, :filled] = keys
        self.values[:, :, :filled] = values

    def append(self, k: torch.Tensor, v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k (B, Hk, 1, Dk) and v (B, Hk, 1, Dv) at position n; return keys and values [0, n]."""
        self.keys[:, :, n : n + 1] = k
        self.values[:, :, n : n + 1] = v
        return self.keys[:, :, : n + 1], self.values[:, :, : n + 1]


class StaticLatent:
    """MLA's cache for one layer, preallocated: the normalised latent and the rotated RoPE key of every position,
    side by side in one (B, 1, S_max, C + R) buffer, so the attention keys [latent; k_rope] and values (latent)
    of a step are both views of it (no concatenation of the whole cache per step)."""

    def __init__(self, latent: torch.Tensor, k_rope: torch.Tensor, max_len: int) -> None:
        bsz, _, filled, rank = latent.shape  # the prefill's (B, 1, T, C); k_rope (B, 1, T, R)
        self.rank = rank
        self.buffer = latent.new_empty(bsz, 1, max_len, rank + k_rope.shape[-1])
        self.buffer[:, :, :filled, :rank] = latent
        self.buffer[:, :, :filled, rank:] = k_rope

    def append(self, latent: torch.Tensor, k_rope: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write latent (B, 1, 1, C) and k_rope (B, 1, 1, R) at position n; return the keys (B, 1, n + 1, C + R)
        and values (B, 1, n + 1, C) of positions [0, n]."""
        self.buffer[:, :, n : n + 1, : self.rank] = latent
        self.buffer[:, :, n : n + 1, self.rank :] = k_rope
        keys = self.buffer[:, :, : n + 1]
        return keys, keys[..., : self.rank]


class RopeTable:
    """`cos`/`sin` of positions [0, max_len) from the model's `RotaryEmbedding`, looked up per step by position.

    For the rotate-half layout the table keeps `sin` with its first half negated, so `rotate` needs no negation
    per step: `rotate_half(x) * sin == roll(x, rot/2) * signed_sin` exactly (a sign flip is exact).
    """

    def __init__(self, rotary: RotaryEmbedding, max_len: int, like: torch.Tensor, interleaved: bool = False) -> None:
        positions = torch.arange(max_len, device=like.device)[None]  # (1, S_max)
        cos, sin = rotary(like, positions)  # (1, S_max, rot) each, in like.dtype
        self.cos, self.sin = cos[0], sin[0]  # (S_max, rot)
        if not interleaved:
            half = self.sin.shape[-1] // 2
            self.sin = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, 1) -> cos, sin (B, 1, 1, rot): broadcast over heads like `apply_rotary` does."""
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


class DecodeState:
    """Everything a model's `decode_step` keeps between steps: per-layer caches, the RoPE table, the padding mask,
    per-session weights, and how many tokens the cache holds (`length`, the same for all rows: left padding)."""

    def __init__(self, length: int, max_len: int, attention_mask: torch.Tensor | None) -> None:
        self.length = length
        self.max_len = max_len
        self.layers: list = []
        self.weights: list = []
        self.rope: RopeTable | None = None
        self.final_norm: torch.Tensor | None = None  # the final norm's `norm_weight`
        # (B, 1, 1, S_max) bool, True = may attend; None = no padding anywhere (one query needs no mask then).
        self.full_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            full = torch.ones(attention_mask.shape[0], max_len, dtype=torch.bool, device=attention_mask.device)
            full[:, : attention_mask.shape[1]] = attention_mask.bool()
            self.full_mask = full[:, None, None, :]

    def mask(self) -> torch.Tensor | None:
        """The mask of the step now running, (B, 1, 1, length + 1), or None."""
        return None if self.full_mask is None else self.full_mask[..., : self.length + 1]

    def check_room(self, steps: int = 1) -> None:
        """Refuse to write past the preallocated buffers (the caller sized them for the whole decode)."""
        if self.length + steps > self.max_len:
            raise ValueError(f"decode state full: {self.length} tokens cached, room for {self.max_len}")


def begin_step(
    model, input_ids: torch.Tensor, position_ids: torch.Tensor, state: DecodeState
) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The start every model's `decode_step` shares: (token embeddings x (B, D), tokens already cached n, the
    step's padding mask or None, RoPE cos and sin (B, 1, 1, rot)). x is 2-D: the step's matmuls skip a reshape."""
    state.check_room()
    cos, sin = state.rope(position_ids)
    x = F.embedding(input_ids[:, 0], model.model.embed_tokens.weight)  # (B, D)
    return x, state.length, state.mask(), cos, sin


def end_step(model, x: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """The end every `decode_step` shares: one more token cached; final norm and output head -> logits (B, V)."""
    state.length += 1
    return dense.linear(rms_norm(x, model.model.norm, state.final_norm), model.lm_head.weight)


def norm_weight(norm: RMSNorm) -> torch.Tensor:
    """The scale `F.rms_norm` needs for an `RMSNorm`: its weight, or `1 + w` for the zero-centred variant."""
    return 1.0 + norm.weight.float() if norm.zero_centered else norm.weight


def rms_norm(x: torch.Tensor, norm: RMSNorm, weight: torch.Tensor) -> torch.Tensor:
    """`norm(x)` in one fused op for fp32 (`weight` from `norm_weight`). In lower precision the module's own forward
    runs (it rounds between steps in a particular order, which the fused op would not reproduce)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, norm.eps)
    return norm.forward(x)


def linear(x: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
    """`module(x)` for an `nn.Linear` without `nn.Module.__call__`."""
    return dense.linear(x, module.weight, module.bias)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE on the first `cos.shape[-1]` channels of x (B, H, 1, D) with `RopeTable` rows: the numbers of
    `layers.rope._rotate` (rotate-half, or DeepSeek's interleaved pairs with de-interleaved output)."""
    rot = cos.shape[-1]
    half = rot // 2
    x_rot = x if rot == x.shape[-1] else x[..., :rot]
    if interleaved:
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    else:  # rotate_half(x) = (-x2, x1): the roll gives (x2, x1), the signed table the minus
        out = x_rot * cos + x_rot.roll(half, dims=-1) * sin
    return out if rot == x.shape[-1] else torch.cat((out, x[..., rot:]), dim=-1)


def swiglu(x: torch.Tensor, mlp) -> torch.Tensor:
    """`SwiGLUMLP` on x without the module calls."""
    gated = F.silu(dense.linear(x, mlp.gate_proj.weight)) * dense.linear(x, mlp.up_proj.weight)
    return dense.linear(gated, mlp.down_proj.weight)


def routed_experts_small(experts, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """`RoutedExperts` for a handful of tokens (decoding): gather the chosen experts' weights and batch-matmul.

    x (T, D), topk_idx / topk_weight (T, K) -> (T, D). With T * K slots at most the number of experts this reads
    no more weight than the sorted dispatch + grouped matmul, in about a third of the ops. The K outputs of a token
    are weighted and summed in the weights' promoted dtype, as `combine` does.
    """
    num_tokens, top_k = topk_idx.shape
    flat = topk_idx.reshape(-1)  # (S,)
    x_slots = x.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # (S, D, 1)
    gate_up = torch.bmm(experts.gate_up_proj.index_select(0, flat), x_slots)  # (S, 2I, 1)
    gate, up = gate_up.squeeze(-1).chunk(2, dim=-1)  # (S, I) each
    hidden = (F.silu(gate) * up).unsqueeze(-1)  # (S, I, 1)
    out = torch.bmm(experts.down_proj.index_select(0, flat), hidden).squeeze(-1)  # (S, D)
    weighted = out * topk_weight.reshape(-1, 1)  # (S, D)
    return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)  # (T, D)


SMALL_EXPERTS_MAX_BYTES_CPU = 512 * 1024  # weights a CPU decode step may gather (see `use_small_experts`)


def use_small_experts(experts, num_tokens: int, top_k: int) -> bool:
    """Gathering weights pays off while the slots do not outnumber the experts (and all experts are local), and, on
    a CPU, while the gathered copies stay small: `index_select` writes every chosen expert's weights again before the
    matmuls read them. One token of the `base` mini_deepseekv3 gathers 9.4 MB per layer: 1.2 ms, against 0.42 ms
    for the sorted dispatch and grouped matmul, which read the weights in place (2 threads; they cross near 0.5 MB).
    """
    slots = num_tokens * top_k
    if experts.expert_parallel is not None or slots > experts.num_experts:
        return False
    weight = experts.gate_up_proj
    if weight.device.type != "cpu":
        return True
    per_expert = (weight[0].numel() + experts.down_proj[0].numel()) * weight.element_size()
    return slots * per_expert <= SMALL_EXPERTS_MAX_BYTES_CPU
