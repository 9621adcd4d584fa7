"""Data pipeline: raw text and chats -> token data the trainer reads (contracts in docs/design.md, Data).

Modules: `sources` (reading files / globs / HF datasets), `pretrain` (token shards, `PretrainDataset`,
`check_shards_match`), `sampler` (`ResumableSampler`), `sft` (chat formats, templating, label masking, `SFTDataset`),
`packing` (best-fit-decreasing), `collate` (`PaddedCollator`, `PackedCollator`), `builtin` (the shipped sample),
`manifest` (manifests and atomic output directories).

The names below are importable from `minillm.data` directly; the modules load on first use so that importing the
package stays cheap (no torch until a dataset or collator is needed).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_pretrain_shards": "pretrain",
    "PretrainDataset": "pretrain",
    "check_shards_match": "pretrain",
    "build_sft_dataset": "sft",
    "SFTDataset": "sft",
    "ResumableSampler": "sampler",
    "PaddedCollator": "collate",
    "PackedCollator": "collate",
    "pack_best_fit_decreasing": "packing",
    "builtin_pretrain_shards": "builtin",
    "builtin_sft_dataset": "builtin",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"minillm.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'minillm.data' has no attribute {name!r}")
