"""Causal softmax attention over (B, H, L, D) tensors, shared by every softmax-attention layer of the zoo.

What a query may see is decided once per model forward by `prepare_attention` and reused by every layer:
- causality, aligned to the *end* of the keys, so it is right with a KV cache (query length < key length);
- padding: a 2-D `attention_mask` (1 = real token) over all keys, past and present (left padding for generation);
- packed documents: `position_ids` that restart at 0 start a new document; a query sees only keys of its own
  document (block-diagonal causal attention), so packing never lets one document attend to another.

`prepare_attention` returns one of three things, all accepted by `sdpa_attention`:
- `None`: nothing but causality applies; SDPA runs with `is_causal=True` (its fastest kernels);
- a boolean mask (B or 1, 1, Lq, Lk) (True = may attend): padding or packing with a KV cache (generation);
- `PackedDocs`: a forward without past (training, prefill) whose rows hold several documents or padding. It keeps
  the document ids and builds, once for all layers, whatever form the chosen kernel needs: given the model's
  `AttentionLayout`, before the layers run (so compiled layers keep one graph), else on first use.

Dispatch for `PackedDocs` (`sdpa_attention`; `force_attention_backend` overrides it, e.g. in tests):
1. "flash": CUDA, fp16/bf16 (the tensors' dtype, or autocast's under mixed precision), `flash_attn` installed
   (extra `gpu`): `flash_attn_varlen_func` over the unpadded tokens with `cu_seqlens`. Masked blocks cost nothing
   and no (L, L) mask exists. flash-attn 3 (`flash_attn_interface`) is preferred when present.
2. "flex": CUDA, fp16/bf16, without flash-attn and without dropout: `flex_attention`, compiled once per process,
   with a document-causal `BlockMask`, which also skips the masked blocks. (Not in fp32, and not for GQA layers
   whose length is not a multiple of 128: on an H200 with torch 2.11 its compilation found no kernel for those.)
3. otherwise (CPU above all: flex_attention has no CPU backward) the dense block-diagonal mask, on the kernel of
   the next rule.

Dispatch for plain causality, a boolean mask, and the dense mask of rule 3 (`dense_backend`):
1. "math": CPU, no past, no dropout, bf16/fp16 (or MLA's unequal head dims in any dtype), at most 512 tokens (MLA
   in bf16/fp16: 2,048), plain causality or a mask built here (never a caller's 4-D mask, which may block a whole
   row): `math_attention`, two batched matmuls around a softmax with a hand-written backward (1.5-2.2x SDPA's CPU
   kernel per bf16 layer at 256 tokens; layers/math_attention.py).
2. "sdpa": everywhere else: `F.scaled_dot_product_attention`, the exact reference of the other paths.

Every query may always attend to itself, so rows that are pure padding produce finite garbage (SDPA, flex) or
zeros (flash) instead of NaN; real tokens never see a padding key.

Grouped-query attention is SDPA's `enable_gqa` (flex: `enable_gqa`, flash-attn: native): K/V keep their
`n_kv_heads`, no `repeat_kv` copy.

Shape legend: B batch, H query heads, Hk key/value heads, Lq queries, Lk keys, D head dim, Dv value head dim,
T real (non-padding) tokens of a batch, N documents.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minillm.errors import UserError
from minillm.models.layers.kernel_choice import KernelChoice
from minillm.models.layers.math_attention import math_attention, math_attention_applies
from minillm.models.layers.tensor_memo import keep_host_copy, per_tensor, to_device, with_host_copy

BACKENDS = ("sdpa", "flex", "flash", "math")


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Number the documents of packed rows: (B, L) positions -> (B, L) ids, a new id wherever a position is 0.

    A row `[0 1 2 0 1 0 1 2 3]` becomes `[1 1 1 2 2 3 3 3 3]`. A row that does not start at 0 (a continuation
    chunk) keeps id 0 until its first restart.
    """
    return (position_ids == 0).cumsum(dim=-1)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions (1, T) of a packed row from cumulative document lengths (flash-attn's `cu_seqlens`).

    `[0, 3, 5, 9]` (documents of 3, 2 and 4 tokens) becomes `[[0 1 2 0 1 0 1 2 3]]`: the form every minillm model
    takes, so collators that produce `cu_seqlens` can feed the models directly.
    """
    cu_seqlens = cu_seqlens.long()
    total = int(cu_seqlens[-1])
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # (n_docs,)
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)  # (T,) start of each token's document
    return (torch.arange(total, device=cu_seqlens.device) - starts)[None]


def has_document_restarts(position_ids: torch.Tensor) -> bool:
    """True when some row has a position 0 after its first token, i.e. holds more than one document."""
    return per_tensor(position_ids, "restarts", lambda t: bool((t[:, 1:] == 0).any()))


def has_padding(attention_mask: torch.Tensor | None) -> bool:
    """True when a (B, L) attention mask marks some token as padding (0); None marks none."""
    return attention_mask is not None and per_tensor(attention_mask, "padding", lambda t: not bool(t.bool().all()))


def build_attention_mask(
    query_len: int,
    key_len: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
    padded: bool | None = None,
    packed: bool | None = None,
) -> torch.Tensor | None:
    """The boolean mask (B or 1, 1, Lq, Lk) for `sdpa_attention`, or None when plain causal attention is exact.

    Args:
        query_len: Lq, the tokens of this forward.
        key_len: Lk, the cached tokens plus this forward's (the queries are the last Lq keys).
        attention_mask: (B, Lk) 1 for real tokens, 0 for padding; or an already-built 4-D boolean mask (returned
            as is). All-ones masks are treated as absent.
        position_ids: (B, Lq) positions; restarts at 0 mark packed documents. Only used without a cache
            (Lq == Lk): a cache holds one document per row.
        padded, packed: whether the mask holds padding and the positions restart, when the caller knows (None: read
            from the tensors).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    past_len = key_len - query_len
    if past_len < 0:
        raise ValueError(f"more queries ({query_len}) than keys ({key_len})")
    if padded is None:
        padded = has_padding(attention_mask)
    if padded and attention_mask.shape[-1] != key_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} tokens, expected {key_len} (past + new)"
        )
    packed = position_ids is not None and past_len == 0 and query_len > 1 and (
        has_document_restarts(position_ids) if packed is None else packed
    )
    if not padded and not packed and (query_len == key_len or query_len == 1):
        return None

    q_idx = torch.arange(query_len, device=device)[:, None] + past_len  # (Lq, 1) absolute query index
    k_idx = torch.arange(key_len, device=device)[None, :]  # (1, Lk)
    mask = (k_idx <= q_idx)[None]  # (1, Lq, Lk) causal, end-aligned
    if packed:
        doc = document_ids_from_position_ids(position_ids.to(device))  # (B, L)
        mask = mask & (doc[:, :, None] == doc[:, None, :])  # (B, Lq, Lk) block-diagonal
    if padded:
        mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]  # (B, Lq, Lk)
    mask = mask | (k_idx == q_idx)[None]  # a query always sees itself: no all-masked (NaN) rows
    return mask[:, None]  # (B or 1, 1, Lq, Lk)


@dataclass(frozen=True)
class VarlenIndex:
    """A padded and/or packed batch as flash-attn's varlen kernels see it: the real tokens back to back, cut into
    documents by `cu_seqlens`."""

    cu_seqlens: torch.Tensor  # (N + 1,) int32: where each document starts in the (T,) tokens, then T
    max_seqlen: int  # tokens of the longest document (a host int: the kernels size their grid with it)
    token_index: torch.Tensor | None  # (T,) int64: the real tokens' places in the flattened (B * L); None = all


def varlen_index(doc_ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> VarlenIndex:
    """flash-attn's `cu_seqlens` from (B, L) document ids: padding (token_mask False) is dropped, then a document
    ends wherever the id changes or a row ends.

    Rows `[[1 1 1 2 2], [1 1 1 pad pad]]` give cu_seqlens `[0, 3, 5, 8]`, max_seqlen 3 and token_index
    `[0 1 2 3 4 5 6 7]`. Padding inside a document (not produced by our collators) joins its two halves, as the
    dense mask does.
    """
    bsz, seq_len = doc_ids.shape
    doc = doc_ids.reshape(-1)  # (B * L,)
    row = torch.arange(bsz, device=doc.device).repeat_interleave(seq_len)  # (B * L,)
    token_index = None
    if token_mask is not None:
        token_index = token_mask.reshape(-1).nonzero().squeeze(1)  # (T,)
        doc, row = doc[token_index], row[token_index]
    total = doc.numel()
    starts = torch.ones(total, dtype=torch.bool, device=doc.device)  # (T,) True where a document begins
    starts[1:] = (doc[1:] != doc[:-1]) | (row[1:] != row[:-1])
    end = torch.tensor([total], device=doc.device)
    cu_seqlens = torch.cat([starts.nonzero().squeeze(1), end]).to(torch.int32)  # (N + 1,)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if total else 0
    return VarlenIndex(cu_seqlens, max_seqlen, token_index)


@dataclass(frozen=True)
class AttentionLayout:
    """A model's softmax-attention shape, all that (with the device, dtype and length) decides the kernel of a
    packed batch: known before the layers run, so `prepare_attention` can build the kernel's input there."""

    heads: int  # query heads
    kv_heads: int  # key/value heads as the layers pass them to `sdpa_attention`
    qk_dim: int  # query/key head dim
    v_dim: int  # value head dim
    dropout_p: float = 0.0  # attention dropout of this forward (0 in eval)


class PackedDocs:
    """The documents of a batch without past (training, prefill): which tokens are real, which document each is in.

    `prepare_attention` builds it once per model forward; every layer hands it to `sdpa_attention`. Each path reads
    the form it needs (`dense_mask()`, `varlen()`, `block_mask()`), cached here, so built once per forward whatever
    the number of layers (the MTP block of mini_deepseekv3 reuses the trunk's). Given the model's
    `AttentionLayout`, `prepare_attention` chooses the kernel and builds its form right away (`prepare`), outside
    the layers: a layer compiled with `--compile` then reads it without leaving its graph. Without one, the form is
    built on first use, eagerly even inside a compiled layer (`torch.compiler.disable`, a graph break): the
    builders are data-dependent (nonzero, host ints).
    """

    def __init__(
        self,
        position_ids: torch.Tensor,  # (B or 1, L)
        attention_mask: torch.Tensor | None,  # (B, L) 1 = real token, or None (no padding)
        batch_size: int,
        device: torch.device | None = None,
        packed: bool | None = None,  # whether the positions restart (None: read them)
    ) -> None:
        def rows(t: torch.Tensor) -> torch.Tensor:  # (B or 1, L) -> (B, L), a host copy kept alongside (tensor_memo)
            return with_host_copy(lambda x: x.expand(batch_size, -1), t if device is None else to_device(t, device))

        self.position_ids = rows(position_ids)  # (B, L)
        self.attention_mask = None if attention_mask is None else rows(attention_mask)
        self.doc_ids = with_host_copy(document_ids_from_position_ids, self.position_ids)  # (B, L)
        # (B, L) the document ids with padding as -1: what the varlen and flex forms are built from
        self.documents = self.doc_ids if self.attention_mask is None else with_host_copy(
            lambda ids, mask: ids.masked_fill(mask == 0, -1), self.doc_ids, self.attention_mask)
        self.packed = has_document_restarts(position_ids) if packed is None else packed
        self._cache: dict[str, object] = {}
        self.backend: str | None = None  # the kernel `prepare` chose for the layers (None: each layer chooses)
        self.flash: tuple[Callable, bool] | None = None  # `flash_varlen_function()`, looked up by `prepare`

    @property
    def seq_len(self) -> int:
        return self.doc_ids.shape[1]

    def prepare(self, layout: AttentionLayout, dtype: torch.dtype) -> None:
        """Choose the kernel for layers of `layout` whose inputs are `dtype` (autocast's dtype applies on top, as
        in the layers) and build its form now, outside any compiled layer."""
        device = self.doc_ids.device
        self.backend = choose_packed_backend(device.type, compute_dtype(device.type, dtype), layout, self.seq_len)
        if self.backend == "flash":
            self.flash = flash_varlen_function()
            self.varlen()
        elif self.backend == "flex":
            self.block_mask()
        else:
            self.dense_mask()

    def dense_mask(self) -> torch.Tensor | None:
        """The (B, 1, L, L) boolean block-diagonal causal mask of the SDPA path (None: plain causal is exact)."""
        return self._cache["dense"] if "dense" in self._cache else self._build_dense_mask()

    def varlen(self) -> VarlenIndex:
        """Unpadding indices, `cu_seqlens` and `max_seqlen` for `flash_attn_varlen_func`: found on the host when
        the batch has a host copy (the trainer's), else read from the device (a `nonzero` and a host int, waits)."""
        return self._cache["varlen"] if "varlen" in self._cache else self._build_varlen()

    def block_mask(self):
        """flex_attention's document-causal `BlockMask`: q sees kv when kv <= q in the same document; padding keys
        carry document -1, which no real query has."""
        return self._cache["block"] if "block" in self._cache else self._build_block_mask()

    @torch.compiler.disable
    def _build_dense_mask(self) -> torch.Tensor | None:
        length = self.seq_len
        self._cache["dense"] = build_attention_mask(
            length, length, self.attention_mask, self.position_ids, self.doc_ids.device,
            padded=self.attention_mask is not None, packed=self.packed,
        )
        return self._cache["dense"]

    @torch.compiler.disable
    def _build_varlen(self) -> VarlenIndex:
        padded = self.attention_mask is not None
        self._cache["varlen"] = per_tensor(
            self.documents, "varlen", lambda docs: varlen_index(docs, docs >= 0 if padded else None))
        return self._cache["varlen"]

    @torch.compiler.disable
    def _build_block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        doc = self.documents  # (B, L)

        def document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

        bsz, length = doc.shape
        # Compiled on CUDA so the (L, L) mask is never materialised; eager on CPU (tests) to save compile time.
        # (torch.compile(create_block_mask) is what torch recommends; its `_compile=True` flag is deprecated.)
        make = _compiled_create_block_mask() if doc.is_cuda else create_block_mask
        self._cache["block"] = make(document_causal, bsz, None, length, length, device=doc.device)
        return self._cache["block"]


AttentionMask = torch.Tensor | PackedDocs | None  # what `prepare_attention` returns and `sdpa_attention` takes


def prepare_attention(
    query_len: int,
    key_len: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
    batch_size: int = 1,
    layout: AttentionLayout | None = None,
    dtype: torch.dtype | None = None,
) -> AttentionMask:
    """What every layer's `sdpa_attention` takes for one forward; call it once per model forward.

    `PackedDocs` for a forward without past whose rows hold several documents or padding (the case that has a
    varlen/flex path on CUDA); otherwise `build_attention_mask` (a dense mask with a cache, None for plain causal).
    With the model's `layout` and its activations' `dtype`, a `PackedDocs` comes with its kernel chosen and that
    kernel's input built (`PackedDocs.prepare`), so compiled layers read it without a graph break.
    `position_ids` are the caller's, None when the model numbered the tokens itself: then they cannot restart, and
    nothing is read back from the device to find out (on a GPU such a read waits for all queued work, and
    pretraining, which passes neither positions nor a mask, would wait once per forward).
    """
    if attention_mask is None or attention_mask.dim() == 2:
        padded = has_padding(attention_mask)
        no_past = query_len == key_len and query_len > 1
        if no_past and (not padded or attention_mask.shape[-1] == key_len):
            packed = position_ids is not None and has_document_restarts(position_ids)
            if padded or packed:
                if position_ids is None:  # (1, L): one document per row, its values known on the host too
                    position_ids = torch.arange(query_len, device=device)[None]
                    keep_host_copy(position_ids, torch.arange(query_len)[None])
                docs = PackedDocs(position_ids, attention_mask if padded else None, batch_size, device, packed)
                if layout is not None and dtype is not None:
                    docs.prepare(layout, dtype)
                return docs
            position_ids = None  # checked above: no restarts, nothing for build_attention_mask to read back again
    return build_attention_mask(query_len, key_len, attention_mask, position_ids, device)


# ---------------------------------------------------------------- backends for PackedDocs

FLASH_MAX_HEAD_DIM = 256  # flash-attn 2/3 kernels exist for head dims up to 256
# flex_attention's block (tokens). On an H200 with torch 2.11 its compilation found no kernel for GQA layers whose
# length is not a multiple of it (96 tokens failed; 128, 256 and 512 compiled; without GQA 96 compiled too).
FLEX_BLOCK_SIZE = 128
_BACKEND_CHOICE = KernelChoice("attention backend", "MINILLM_ATTENTION_BACKEND", BACKENDS)


def force_attention_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Use backend `name` ("sdpa", "flex", "flash", "math") in this block, whatever the device and dtype (None:
    automatic): "flex" and "flash" for every `PackedDocs` attention, "math" for every forward without past, "sdpa"
    for everything else. Tests and benchmarks use it; the environment variable `MINILLM_ATTENTION_BACKEND` does the
    same for a whole process."""
    return _BACKEND_CHOICE.force(name)


@functools.cache
def flash_varlen_function() -> tuple[Callable, bool] | None:
    """flash-attn's `flash_attn_varlen_func` and whether it takes `dropout_p`, or None when not installed.

    flash-attn 3 (`flash_attn_interface`, Hopper) first, then flash-attn 2 (`flash_attn`). Cached; tests that put
    a stand-in module in `sys.modules` call `flash_varlen_function.cache_clear()`.
    """
    import importlib

    for module, takes_dropout in (("flash_attn_interface", False), ("flash_attn", True)):
        try:
            return importlib.import_module(module).flash_attn_varlen_func, takes_dropout
        except (ImportError, AttributeError):
            continue
    return None


@functools.cache
def _compiled_create_block_mask() -> Callable:
    """`create_block_mask` wrapped in torch.compile once per process (CUDA: no (B, L, L) mask in memory)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


@functools.cache
def _compiled_flex_attention() -> Callable | None:
    """`flex_attention` wrapped in torch.compile once per process (eager flex is a slow reference), or None."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention)


def flash_head_dim(qk_dim: int, v_dim: int) -> int:
    """The one head dim flash-attn runs q, k and v at: the larger, rounded up to a multiple of 8.

    flash-attn 2 needs equal q/k/v head dims (MLA has qk_head_dim != v_head_dim): the smaller side is zero-padded,
    which changes no score (zeros add nothing to q.k; the scale is passed explicitly) and only adds zero output
    channels, sliced off afterwards.
    """
    return -(-max(qk_dim, v_dim) // 8) * 8


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype attention runs in on `device_type`: autocast's when autocast is on there, else `dtype`.

    Under Accelerate's bf16/fp16 mixed precision the weights stay fp32, so q and k leave RoPE (fp32 cos/sin) in
    fp32 while v leaves its projection in bf16. SDPA and flex_attention cast to autocast's dtype themselves;
    flash-attn does not, so the dispatch and the flash path must look at this dtype, not at q's.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def packed_backend(q: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, kv_heads: int | None = None) -> str:
    """The path `sdpa_attention` takes for a `PackedDocs` mask with these tensors (see the module docstring);
    `kv_heads`: K/V's head count when known (grouped-query attention when it differs from q's)."""
    layout = AttentionLayout(q.shape[1], q.shape[1] if kv_heads is None else kv_heads, q.shape[-1], v.shape[-1],
                             dropout_p)
    device_type = "cuda" if q.is_cuda else "cpu"  # only CUDA has other paths than SDPA's
    return choose_packed_backend(device_type, compute_dtype(device_type, q.dtype), layout, q.shape[2])


def choose_packed_backend(device_type: str, dtype: torch.dtype, layout: AttentionLayout, seq_len: int) -> str:
    """The path for a `PackedDocs` batch of `seq_len` tokens through layers of `layout` computing in `dtype` on
    `device_type` (see the module docstring)."""
    forced = _BACKEND_CHOICE.pinned()
    if forced is not None:
        return forced
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    flash = flash_varlen_function()
    if (
        flash is not None
        and flash_head_dim(layout.qk_dim, layout.v_dim) <= FLASH_MAX_HEAD_DIM
        and (layout.dropout_p == 0.0 or flash[1])
    ):
        return "flash"
    gqa_ragged = layout.kv_heads != layout.heads and seq_len % FLEX_BLOCK_SIZE != 0
    if layout.dropout_p == 0.0 and not gqa_ragged and _compiled_flex_attention() is not None:
        return "flex"
    return "sdpa"


def dense_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, caller_mask: bool = False
) -> str:
    """The kernel for a dense mask or plain causality: "math" (`math_attention`) or "sdpa" (see the module docstring).

    `caller_mask`: the mask is a caller's 4-D mask, passed through as given. It may block every key of a row, which
    SDPA turns into a row of zeros and the math kernel into NaN, so the automatic choice keeps SDPA for it (the
    masks built here always let a query see itself). A forced "math" runs wherever the kernel can (no past); a
    forced "sdpa" or any other forced name keeps SDPA.
    """
    forced = _BACKEND_CHOICE.pinned()
    if forced == "math" and q.shape[2] == k.shape[2]:
        if dropout_p:
            raise UserError("attention backend 'math' has no attention dropout; set attention_dropout to 0")
        return "math"
    if forced is None and not caller_mask:
        if math_attention_applies(q, k, v, compute_dtype(q.device.type, q.dtype), dropout_p):
            return "math"
    return "sdpa"


def flex_packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs, scale: float | None = None
) -> torch.Tensor:
    """Document-causal attention with compiled flex_attention: q (B, H, L, D), k (B, Hk, L, D), v (B, Hk, L, Dv)
    -> (B, L, H, Dv). No dropout (flex has none); CPU runs forward only (no CPU backward in torch)."""
    if torch.compiler.is_compiling():  # inside a compiled layer: the layer's graph compiles it
        from torch.nn.attention.flex_attention import flex_attention as flex
    else:
        flex = _compiled_flex_attention()
    if flex is None:
        raise RuntimeError("this torch has no torch.nn.attention.flex_attention (needs torch >= 2.5)")
    out = flex(q, k, v, block_mask=docs.block_mask(), scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)  # (B, L, H, Dv)


def flash_packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    docs: PackedDocs,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Document-causal attention with `flash_attn_varlen_func`: q (B, H, L, D), k (B, Hk, L, D), v (B, Hk, L, Dv)
    -> (B, L, H, Dv), zeros at padding tokens.

    The real tokens are gathered into flash-attn's (T, heads, dim) layout, documents given by `cu_seqlens` (the same
    for queries and keys: no past); GQA is native (Hk divides H); head dims are padded to one (`flash_head_dim`).
    """
    flash = docs.flash or flash_varlen_function()  # looked up by `PackedDocs.prepare`, outside compiled layers
    if flash is None:
        # only reachable by forcing the backend (MINILLM_ATTENTION_BACKEND): automatic dispatch checks first
        raise UserError("attention backend 'flash': flash-attn is not installed (pip install 'minillm[gpu]' on a "
                        "CUDA machine)")
    fn, takes_dropout = flash
    if dropout_p and not takes_dropout:
        raise UserError("attention backend 'flash': flash-attn 3 has no attention dropout; set attention_dropout "
                        "to 0")
    bsz, heads, seq_len, qk_dim = q.shape
    v_dim = v.shape[-1]
    dim = flash_head_dim(qk_dim, v_dim)
    dtype = compute_dtype(q.device.type, q.dtype)  # under autocast q/k may be fp32 and v bf16: one dtype for all
    index = docs.varlen()
    if index.max_seqlen == 0:  # every token is padding
        return q.new_zeros(bsz, seq_len, heads, v_dim, dtype=dtype)

    def unpad(x: torch.Tensor) -> torch.Tensor:  # (B, h, L, d) -> (T, h, dim)
        x = x.to(dtype).transpose(1, 2).reshape(bsz * seq_len, x.shape[1], x.shape[3])  # (B * L, h, d)
        if index.token_index is not None:
            x = x.index_select(0, index.token_index)  # (T, h, d)
        return F.pad(x, (0, dim - x.shape[-1])) if x.shape[-1] < dim else x

    kwargs = {"softmax_scale": scale if scale is not None else 1.0 / math.sqrt(qk_dim), "causal": True}
    if dropout_p:
        kwargs["dropout_p"] = dropout_p
    out = fn(
        unpad(q), unpad(k), unpad(v),
        index.cu_seqlens, index.cu_seqlens, index.max_seqlen, index.max_seqlen,
        **kwargs,
    )
    if isinstance(out, tuple):  # some flash-attn 3 releases return (out, softmax_lse)
        out = out[0]
    out = out[..., :v_dim]  # (T, H, Dv)
    if index.token_index is not None:
        out = out.new_zeros(bsz * seq_len, heads, v_dim).index_copy(0, index.token_index, out)  # (B * L, H, Dv)
    return out.reshape(bsz, seq_len, heads, v_dim)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention: q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv) -> (B, Lq, H, Dv).

    `mask` comes from `prepare_attention` (or `build_attention_mask`); None means causal (Lq == Lk) or, for a single
    query, everything. A `PackedDocs` goes to the flash/flex/SDPA path of `packed_backend`. The output is
    transposed to (B, Lq, H, Dv) so callers can `reshape(B, Lq, H * Dv)` for the output projection.
    """
    caller_mask = isinstance(mask, torch.Tensor)  # a caller's 4-D mask or one with a past (see dense_backend)
    if isinstance(mask, PackedDocs):
        backend = mask.backend or packed_backend(q, v, dropout_p, k.shape[1])  # chosen by `prepare`, if it ran
        if backend == "flash":
            return flash_packed_attention(q, k, v, mask, scale, dropout_p)
        if backend == "flex":
            if dropout_p:
                raise UserError("attention backend 'flex': flex_attention has no attention dropout; set "
                                "attention_dropout to 0")
            return flex_packed_attention(q, k, v, mask, scale)
        mask = mask.dense_mask()
    if dense_backend(q, k, v, dropout_p, caller_mask) == "math":
        dtype = compute_dtype(q.device.type, q.dtype)  # under autocast q/k may be fp32 and v bf16: one dtype
        with torch.autocast(q.device.type, enabled=False):
            out = math_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale)  # (B, H, Lq, Dv)
        return out.transpose(1, 2)
    is_causal = mask is None and q.shape[2] > 1
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.is_cuda:
        # On CUDA only the flash and math kernels take `enable_gqa`, and flash takes no mask: expanding K/V keeps
        # masked attention on the memory-efficient kernel instead of the slow math fallback.
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, Lk, D)
        gqa = False
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )  # (B, H, Lq, Dv)
    return out.transpose(1, 2)
