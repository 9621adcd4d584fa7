"""Optional GPU kernels for Gated DeltaNet: flash-linear-attention (fla) and causal-conv1d, with the torch fallback.

On CUDA, with the optional extra `gpu` installed (`pip install -e .[gpu]`, which brings flash-linear-attention), the
gated delta rule runs in fla's Triton kernels, and with `pip install causal-conv1d` (not in the extra: it compiles
against the local CUDA toolkit) the short convolution runs in its CUDA kernel. Everywhere else (CPU, fp32 activations,
packages missing or failing to import) `gated_deltanet.py`'s torch code runs. Both compute the same function (tests/test_fla_dispatch.py checks
our argument passing and layout conversions against stand-in modules that implement the same signatures).

Targeted APIs (the signatures are stable across the versions named):
- flash-linear-attention >= 0.3 (tested against the 0.3 - 0.6 signatures), module `fla.ops.gated_delta_rule`:
    chunk_gated_delta_rule(q, k, v, g=, beta=, scale=, initial_state=, output_final_state=,
                           use_qk_l2norm_in_kernel=, cu_seqlens=) -> (o, final_state)
    fused_recurrent_gated_delta_rule(q, k, v, g=, beta=, scale=, initial_state=, output_final_state=,
                                     use_qk_l2norm_in_kernel=, cu_seqlens=) -> (o, final_state)
  Layout "batch, time, head" (not head-first): q, k (B, T, H, K), v (B, T, H, V), g and beta (B, T, H), g the
  log decay in fp32; states (N, H, K, V) in fp32, N = number of sequences. Packed documents are passed flattened
  to B = 1 with `cu_seqlens` (N + 1,) int64 boundaries, one initial state per sequence. We always pass every
  argument by keyword and broadcast q/k to the value heads ourselves, so versions with and without fla's grouped
  value attention (q/k with fewer heads than v) behave the same. Older fla versions refuse fp32 inputs, so the
  kernels are used for bf16/fp16 activations only (bf16 autocast on a GPU, the recommended setup).
- causal-conv1d >= 1.1, module `causal_conv1d`: causal_conv1d_fn(x (B, D, L), weight (D, K), bias=None,
  seq_idx=None, activation="silu") -> (B, D, L); `seq_idx` (B, L) int32 marks each token's document (it needs a
  channels-last x, which our (B, L, D) activations are once transposed). Used when there is no carried-in conv
  window; a continuation from a cache keeps the torch convolution.

Why not transformers' kernel hub: our torch path is a different (batched, chunk-major) formulation with packed
document support of its own, so we call the packages directly and keep the dispatch condition in one place.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from minillm.models.layers.tensor_memo import per_tensor

# Where the kernels apply. Module-level so tests can widen them to CPU / fp32 with stand-in modules.
KERNEL_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


@functools.cache
def _import(name: str):
    """The module `name`, or None when it (or one of its own dependencies, e.g. triton) cannot be imported."""
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken install raising anything at import time
        return None


def fla_ops():
    """fla's gated delta rule ops module (`fla.ops.gated_delta_rule`), or None."""
    return _import("fla.ops.gated_delta_rule")


def conv_ops():
    """The causal-conv1d package's module (`causal_conv1d`), or None."""
    return _import("causal_conv1d")


@torch.compiler.assume_constant_result  # compiled layers take the answer as a constant: an import breaks the graph
def _installed(name: str) -> bool:
    """Whether `fla_ops` ("fla") or `conv_ops` ("conv") finds its module; the dispatch's question inside layers."""
    return (fla_ops() if name == "fla" else conv_ops()) is not None


_FLA_PROBES: dict[tuple[str, torch.dtype, int, int], bool] = {}  # fla_works' answers


def clear_cache() -> None:
    """Forget the import and probe results (tests install and remove stand-in modules)."""
    _import.cache_clear()
    _FLA_PROBES.clear()


def _kernels_apply(t: torch.Tensor) -> bool:
    return t.device.type in KERNEL_DEVICE_TYPES and t.dtype in KERNEL_DTYPES


def fla_applies(q: torch.Tensor, v: torch.Tensor | None = None) -> bool:
    """Whether `gated_delta_rule` will run fla's kernels for activations like `q` (and `v`): the package imports
    and its kernels passed `fla_works`' test call on this device, dtype and head sizes."""
    if not _kernels_apply(q) or not _installed("fla"):
        return False
    value_dim = q.shape[-1] if v is None else v.shape[-1]
    return fla_works(str(q.device), q.dtype, q.shape[-1], value_dim)


@torch.compiler.assume_constant_result  # a compiled graph takes the probe's answer as a constant
def fla_works(device: str, dtype: torch.dtype, key_dim: int, value_dim: int) -> bool:
    """Whether fla's chunked kernel computes the gated delta rule right, forward and backward, on `device` in
    `dtype` for heads of these sizes: one small call against our torch path, once per process and configuration.

    fla refuses or breaks some setups only at run time: 0.6 raises in the backward on Hopper GPUs with Triton
    3.4 - 3.7.0 (a Triton miscompilation, fla issue #640), and older versions ran those setups silently wrong.
    Then the torch path trains instead, with a warning, rather than the run failing at its first backward.
    """
    key = (device, dtype, key_dim, value_dim)
    if key not in _FLA_PROBES:
        _FLA_PROBES[key] = _probe_fla(*key)
    return _FLA_PROBES[key]


def _probe_fla(device: str, dtype: torch.dtype, key_dim: int, value_dim: int) -> bool:
    from minillm.models.mini_qwen3_next.gated_deltanet import chunk_gated_delta_rule

    gen = torch.Generator().manual_seed(0)
    length, heads = 128, 2
    q, k = (torch.randn(1, length, heads, key_dim, generator=gen) for _ in range(2))
    v = torch.randn(1, length, heads, value_dim, generator=gen)
    g = -torch.rand(1, length, heads, generator=gen)  # log decay
    beta = torch.rand(1, length, heads, generator=gen)
    results = []
    try:
        fla_rule = functools.partial(gated_delta_rule, output_final_state=False)
        for kernel, run_dtype in ((fla_rule, dtype), (chunk_gated_delta_rule, torch.float32)):
            inputs = [t.to(device, run_dtype).requires_grad_() for t in (q, k, v)]
            with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
                out, _ = kernel(*inputs, g.to(device), beta.to(device, run_dtype))
                out.float().square().sum().backward()
            results.append([out.detach().float()] + [t.grad.float() for t in inputs])
    except Exception as err:  # whatever the package raises: the torch path still works
        warnings.warn(f"flash-linear-attention's gated delta rule failed a test call on {device} ({err}); "
                      f"Gated DeltaNet uses the torch implementation instead", stacklevel=2)
        return False
    worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item() for a, b in zip(*results, strict=True))
    if not worst <= 0.05:  # bf16 rounding stays near 1e-2 of the largest value; a wrong kernel is off by ~1
        warnings.warn(f"flash-linear-attention's gated delta rule differs from the torch implementation on {device} "
                      f"(max relative error {worst:.2g}); Gated DeltaNet uses the torch implementation instead",
                      stacklevel=2)
        return False
    return True


def conv_applies(x: torch.Tensor, prev: torch.Tensor | None) -> bool:
    """Whether `causal_conv1d_kernel` applies: kernel present, right device/dtype, no carried-in window."""
    return prev is None and _kernels_apply(x) and _installed("conv")


# ----------------------------------------------------------------------------------------------------------------
# Packed rows -> fla's flattened varlen form
# ----------------------------------------------------------------------------------------------------------------


@torch.compiler.disable
def _sequences(doc_starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boundaries of every sequence when the (B, L) rows are flattened to one row of B*L tokens.

    A sequence starts at each document start and at each row start. Returns `cu_seqlens` (N + 1,) int64, and for
    each row the index of its first and of its last sequence, (B,) each. Found once per `doc_starts` tensor
    (`per_tensor`): every Gated DeltaNet layer of a forward gets the same one. Found on the host when `doc_starts`
    has a host copy (a trainer batch's); read from the device otherwise (the `nonzero` waits for it). Eager even
    inside a compiled layer, where the memo and the host copy would be out of reach (a read per layer). fla's
    kernels then read `cu_seqlens` back themselves, to size their grids: that wait is theirs.
    """
    return per_tensor(doc_starts, "sequences", _find_sequences)


def _find_sequences(doc_starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L = doc_starts.shape
    starts = doc_starts.clone()
    starts[:, 0] = True  # rows never continue into each other
    start_pos = starts.reshape(-1).nonzero().squeeze(-1)  # (N,) flat positions
    cu_seqlens = torch.cat([start_pos, start_pos.new_full((1,), B * L)])  # (N + 1,)
    seqs_per_row = starts.sum(dim=1)  # (B,)
    first = seqs_per_row.cumsum(0) - seqs_per_row  # (B,)
    last = first + seqs_per_row - 1  # (B,)
    return cu_seqlens, first, last


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    doc_starts: torch.Tensor | None = None,
    recurrent: bool = False,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule through fla; same arguments and results as `gated_deltanet.chunk_gated_delta_rule`.

    Args:
        q, k: (B, L, Hk, Dk) raw queries and keys (fla L2-normalises them: `use_qk_l2norm_in_kernel=True`).
        v: (B, L, H, Dv); g, beta: (B, L, H); initial_state: (B, H, Dk, Dv) or None.
        doc_starts: (B, L) bool document starts (packed rows), or None.
        recurrent: use `fused_recurrent_gated_delta_rule` (decoding) instead of the chunked kernel.
        output_final_state: False when no cache will keep it (training): fla then skips writing it.

    Returns:
        output (B, L, H, Dv) in q's dtype and the final state (B, H, Dk, Dv) in fp32 (None when not asked for).
    """
    ops = fla_ops()
    kernel = ops.fused_recurrent_gated_delta_rule if recurrent else ops.chunk_gated_delta_rule
    B, L, Hk, Dk = k.shape
    H = v.shape[2]
    if H != Hk:  # each key head serves H/Hk consecutive value heads (same grouping as the torch path)
        q = q.repeat_interleave(H // Hk, dim=2)
        k = k.repeat_interleave(H // Hk, dim=2)
    g = g.float()  # fla expects the log decay in fp32
    beta = beta.to(q.dtype)
    state = None if initial_state is None else initial_state.float()
    kwargs = dict(scale=Dk**-0.5, output_final_state=output_final_state, use_qk_l2norm_in_kernel=True)
    if doc_starts is None:
        o, final = kernel(q, k, v, g=g, beta=beta, initial_state=state, cu_seqlens=None, **kwargs)
        return o.to(q.dtype), (final.float() if output_final_state else None)

    # Packed rows: one flattened row, one sequence per document (and per row start).
    cu_seqlens, first, last = _sequences(doc_starts)
    if state is not None:
        # The first sequence of a row continues the row's state unless the row opens with a document start.
        keep = (~doc_starts[:, 0]).to(state.dtype).view(B, 1, 1, 1)
        per_seq = state.new_zeros(cu_seqlens.numel() - 1, *state.shape[1:])  # (N, H, Dk, Dv)
        state = per_seq.index_copy(0, first, state * keep)
    flat = [t.reshape(1, B * L, *t.shape[2:]) for t in (q, k, v, g, beta)]
    o, final = kernel(flat[0], flat[1], flat[2], g=flat[3], beta=flat[4], initial_state=state,
                      cu_seqlens=cu_seqlens, **kwargs)
    final = final.float().index_select(0, last) if output_final_state else None  # each row's last sequence
    return o.reshape(B, L, *o.shape[2:]).to(q.dtype), final


def causal_conv1d_kernel(
    x: torch.Tensor, weight: torch.Tensor, doc_starts: torch.Tensor | None = None
) -> torch.Tensor:
    """`silu(depthwise causal conv(x))` through causal-conv1d; x (B, L, Cc), weight (Cc, K) -> (B, L, Cc).

    Matches `gated_deltanet.causal_conv1d` without a carried-in window: zeros before each row, and with
    `doc_starts` no tap crosses a document start (`seq_idx`).
    """
    seq_idx = None
    if doc_starts is not None:
        # (B, L) segment index, as in the torch path: tokens before a row's first start are segment 0
        seq_idx = doc_starts.to(torch.int32).cumsum(dim=1, dtype=torch.int32)
    out = conv_ops().causal_conv1d_fn(
        x.contiguous().transpose(1, 2), weight.to(x.dtype), None, seq_idx=seq_idx, activation="silu"
    )  # (B, Cc, L), channels-last like its input
    return out.transpose(1, 2)
