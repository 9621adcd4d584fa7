"""Reusable checks for every minillm architecture (used by tests/test_models_*.py).

Each check takes a model (or a pair of models) and raises AssertionError with a useful message. Models should be
tiny, fp32 and in eval mode; use `initializer_range` around 0.1 so greedy decoding has clear winners (no near-ties
that float noise could flip).

    check_reference_parity(ours, ref, vocab_size)        logits <= 1e-4, loss 1e-5, 20 greedy tokens identical
    check_roundtrip(ours, to_reference, from_reference)  ours -> reference -> ours is bit-identical
    check_save_load(model, tmp_path)                     save_pretrained/from_pretrained, safetensors only
    check_cached_generation(model, vocab_size, batch)    generate() with cache == full recompute, 32 tokens
    check_packed_equivalence(model, vocab_size)          3 documents packed in one row == each alone
    check_chunked_loss(model, vocab_size)                model loss == plain CE on its logits; normaliser; grads
    check_hf_export(model, tmp_path, "LlamaForCausalLM")  export_to_hf loads in a process without minillm, and back
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from minillm.models.layers.loss import reference_cross_entropy, shift_targets


def random_ids(vocab_size: int, *shape: int, seed: int = 0) -> torch.Tensor:
    """Token ids in [1, vocab_size) (0 is eos/pad), from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, shape, generator=gen)


def state_dicts_identical(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Assert two modules hold the same tensors (names, shapes, dtypes, values) bit for bit."""
    sa = {k: v for k, v in a.state_dict().items() if not k.startswith(skip)} if skip else a.state_dict()
    sb = {k: v for k, v in b.state_dict().items() if not k.startswith(skip)} if skip else b.state_dict()
    assert sa.keys() == sb.keys(), f"different keys: {sorted(set(sa) ^ set(sb))}"
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, f"{name}: dtype {sa[name].dtype} != {sb[name].dtype}"
        assert torch.equal(sa[name], sb[name]), f"{name}: values differ"


@torch.no_grad()
def greedy_full_recompute(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, new_tokens: int
) -> torch.Tensor:
    """Greedy decoding that re-runs the whole sequence every step without any cache (the slow, obvious way).
    Token 0 (eos/pad) is never chosen, matching `generate(suppress_tokens=[0])`."""
    ids = input_ids
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    for _ in range(new_tokens):
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        last = logits[:, -1].clone()
        last[:, 0] = float("-inf")
        next_id = last.argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, next_id], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_id)], dim=1)
    return ids[:, input_ids.shape[1] :]


@torch.no_grad()
def check_reference_parity(
    ours: torch.nn.Module,
    ref: torch.nn.Module,
    vocab_size: int,
    logits_atol: float = 1e-4,
    loss_atol: float = 1e-5,
    gen_tokens: int = 20,
) -> dict[str, float]:
    """Same logits, loss and greedy generations as the transformers reference holding the same weights."""
    ours.eval()
    ref.eval()
    ids = random_ids(vocab_size, 2, 24, seed=1)
    diff = (ours(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    assert diff <= logits_atol, f"logits differ from the reference by {diff:.3g}"
    loss_ours = ours(input_ids=ids, labels=ids).loss.item()
    loss_ref = ref(input_ids=ids, labels=ids).loss.item()
    assert abs(loss_ours - loss_ref) <= loss_atol, f"loss {loss_ours} != reference {loss_ref}"
    prompt = ids[:1, :8]
    gen_ours = ours.generate(prompt, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)
    gen_ref = ref.generate(prompt, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)
    assert torch.equal(gen_ours, gen_ref), f"greedy generations differ:\n{gen_ours}\n{gen_ref}"
    padded_diff = _check_left_padded_parity(ours, ref, ids, logits_atol, loss_atol, gen_tokens)
    return {"logits_max_abs_diff": diff, "loss_diff": abs(loss_ours - loss_ref), "padded_diff": padded_diff}


def _check_left_padded_parity(ours, ref, ids, logits_atol, loss_atol, gen_tokens) -> float:
    """A left-padded batch (row 1 has 5 pads, id 0) with `attention_mask`: same logits on the real tokens, same
    loss with the padding ignored, same greedy batched generation as the reference."""
    ids = ids.clone()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes for left padding
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    real = mask.bool()
    diff = (ours(**kwargs).logits[real] - ref(**kwargs).logits[real]).abs().max().item()
    assert diff <= logits_atol, f"left-padded logits differ from the reference by {diff:.3g}"
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 5] = -100  # the reference would predict the first real token from a pad; ours never does (design.md)
    loss_ours, loss_ref = ours(**kwargs, labels=labels).loss.item(), ref(**kwargs, labels=labels).loss.item()
    assert abs(loss_ours - loss_ref) <= loss_atol, f"left-padded loss {loss_ours} != reference {loss_ref}"
    prompt, prompt_mask = ids[:, 12:].clone(), mask[:, 12:].clone()  # pad row 0 by hand
    prompt[0, :3], prompt_mask[0, :3] = 0, 0
    gen = dict(max_new_tokens=gen_tokens // 2, min_new_tokens=gen_tokens // 2, do_sample=False, pad_token_id=0)
    gen_ours = ours.generate(prompt, attention_mask=prompt_mask, **gen)
    gen_ref = ref.generate(prompt, attention_mask=prompt_mask, **gen)
    assert torch.equal(gen_ours, gen_ref), f"left-padded greedy generations differ:\n{gen_ours}\n{gen_ref}"
    return diff


def check_roundtrip(ours: torch.nn.Module, to_reference, from_reference, skip: tuple[str, ...] = ()) -> None:
    """ours -> reference -> ours gives bit-identical tensors (`skip`: name prefixes the reference lacks, e.g. MTP)."""
    back = from_reference(to_reference(ours))
    assert type(back) is type(ours)
    state_dicts_identical(ours, back, skip=skip)


@torch.no_grad()
def check_save_load(model: torch.nn.Module, tmp_path: Path) -> torch.nn.Module:
    """`save_pretrained` + `AutoModelForCausalLM.from_pretrained` round trip: safetensors only, same tensors, same
    logits. Returns the loaded model."""
    model.eval()
    out = Path(tmp_path) / "saved"
    model.save_pretrained(out)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files), files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files), (
        f"pickle files written: {files}"
    )
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(model)
    state_dicts_identical(model, loaded)
    ids = random_ids(model.config.vocab_size, 2, 16, seed=2)
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    return loaded


@torch.no_grad()
def check_cached_generation(
    model: torch.nn.Module, vocab_size: int, batch: int = 1, new_tokens: int = 32
) -> None:
    """`generate()` (which uses the model's cache) equals full-recompute greedy decoding. With batch > 1 the prompts
    have different lengths and are left-padded (pad id 0). A model that ignored its cache would see only the last
    token at each step and fail this check."""
    model.eval()
    lengths = [10 - 2 * (i % 4) for i in range(batch)]  # 10, 8, 6, 4, ...
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = random_ids(vocab_size, n, seed=10 + row)
        mask[row, width - n :] = 1
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        suppress_tokens=[0],  # never emit eos (id 0): every row decodes exactly `new_tokens` argmax steps
        pad_token_id=0,
        do_sample=False,
        use_cache=True,
    )[:, width:]
    expected = greedy_full_recompute(model, ids, mask, new_tokens)
    assert generated.shape == expected.shape == (batch, new_tokens)
    assert torch.equal(generated, expected), (
        f"cached generation differs from full recompute:\n{generated}\n{expected}"
    )
    # The cache must really hold the sequence: one forward with use_cache leaves width tokens in it.
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert out.cache is not None and out.cache.get_seq_length() == width, (
        "forward(use_cache=True) filled no cache"
    )


@torch.no_grad()
def check_packed_equivalence(
    model: torch.nn.Module, vocab_size: int, doc_lengths: tuple[int, ...] = (7, 12, 9), atol: float = 1e-4
) -> float:
    """One row packing several documents (position_ids restarting at 0) gives the same per-token logits as each
    document alone, and the packed loss never predicts a document's first token from the previous document.
    Returns the max abs logits difference."""
    model.eval()
    docs = [random_ids(vocab_size, 1, n, seed=20 + i) for i, n in enumerate(doc_lengths)]
    packed = torch.cat(docs, dim=1)  # (1, sum L)
    position_ids = torch.cat([torch.arange(n) for n in doc_lengths])[None]
    packed_logits = model(input_ids=packed, position_ids=position_ids).logits
    worst, start = 0.0, 0
    for doc in docs:
        alone = model(input_ids=doc).logits
        n = doc.shape[1]
        worst = max(worst, (packed_logits[:, start : start + n] - alone).abs().max().item())
        start += n
    assert worst <= atol, f"packed logits differ from per-document logits by {worst:.3g}"
    # Loss: the packed mean equals the token-weighted mean of the per-document losses (n - 1 targets each).
    packed_loss = model(input_ids=packed, position_ids=position_ids, labels=packed).loss
    n_targets = sum(n - 1 for n in doc_lengths)
    per_doc = sum(model(input_ids=d, labels=d, num_items_in_batch=n_targets).loss for d in docs)
    assert abs(packed_loss.item() - per_doc.item()) <= 1e-5, (
        f"packed loss {packed_loss} != per-document {per_doc}"
    )
    return worst


def check_chunked_loss(model: torch.nn.Module, vocab_size: int) -> None:
    """The model's chunked loss equals plain cross-entropy on its own logits (mean and with an external normaliser,
    with -100 labels), and so do the gradients of every parameter. Give the model a small `loss_chunk_size` so
    several chunks run."""
    model.eval()  # no dropout; gradients still flow
    ids = random_ids(vocab_size, 2, 20, seed=3)
    labels = ids.clone()
    labels[0, :6] = -100
    for normaliser in (None, 50):
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=normaliser).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        logits = model(input_ids=ids).logits
        expected = reference_cross_entropy(logits, shift_targets(labels), normaliser)
        expected.backward()
        assert abs(loss.item() - expected.item()) <= 1e-5, (
            f"chunked loss {loss.item()} != plain {expected.item()}"
        )
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            diff = (grads[name] - p.grad).abs().max().item()
            assert diff <= 1e-5, f"gradient of {name} differs by {diff:.3g} (normaliser {normaliser})"
    model.zero_grad()
    n_targets = int((shift_targets(labels) != -100).sum())
    mean = model(input_ids=ids, labels=labels).loss
    summed = model(input_ids=ids, labels=labels, num_items_in_batch=1).loss
    assert torch.allclose(summed / n_targets, mean, atol=1e-6), (
        "num_items_in_batch does not normalise the sum"
    )


def write_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer of `vocab_size` tokens (`<|endoftext|>` = 0), saved as the trainer saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)


def logits_in_clean_process(
    model_dir: Path, input_ids: torch.Tensor, expected_class: str, out: Path
) -> torch.Tensor:
    """Load `model_dir` with `AutoModelForCausalLM` in a fresh Python that never imports minillm; return its
    logits for `input_ids`. Also checks the tokenizer loads."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}).eval()
        assert type(model).__name__ == {expected_class!r}, type(model).__name__
        assert AutoTokenizer.from_pretrained({str(model_dir)!r}).eos_token == "<|endoftext|>"
        with torch.no_grad():
            logits = model(torch.tensor({input_ids.tolist()})).logits
        assert not any(name.startswith("minillm") for name in sys.modules), "minillm was imported"
        torch.save(logits, {str(out)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=out.parent, timeout=300)
    return torch.load(out)


@torch.no_grad()
def check_hf_export(
    model: torch.nn.Module,
    tmp_path: Path,
    expected_class: str,
    skip: tuple[str, ...] = (),
    atol: float = 1e-4,
) -> Path:
    """Save `model` (+ a tokenizer) like a run's final/, `export_to_hf` it, load the export in a process without
    minillm and compare logits; then `import_from_hf` it back and compare tensors (`skip`: prefixes dropped on
    export, e.g. ("mtp.",)). Returns the export directory."""
    from minillm.models.export import export_to_hf, import_from_hf

    model.eval()
    tmp_path = Path(tmp_path)
    src = tmp_path / "final"
    model.save_pretrained(src)
    write_tiny_tokenizer(src, model.config.vocab_size)
    dst = tmp_path / "exported"
    summary = export_to_hf(src, dst)
    assert summary["reference"] == expected_class
    files = {p.name for p in dst.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files, files
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary directory left behind"
    ids = random_ids(model.config.vocab_size, 2, 12, seed=4)
    theirs = logits_in_clean_process(dst, ids, expected_class, tmp_path / "logits.pt")
    diff = (model(input_ids=ids).logits - theirs).abs().max().item()
    assert diff <= atol, f"exported model's logits differ by {diff:.3g}"
    back = tmp_path / "back"
    import_from_hf(dst, back)
    returned = AutoModelForCausalLM.from_pretrained(back)
    state_dicts_identical(model, returned, skip=skip)
    # every config field comes back, ours the reference lacks included (only the dropped MTP module's count not)
    ours, theirs = model.config.to_dict(), returned.config.to_dict()
    ignored = {"_name_or_path"} | ({"num_mtp_layers"} if "mtp." in skip else set())
    assert {k: (v, theirs.get(k)) for k, v in ours.items() if k not in ignored and v != theirs.get(k)} == {}
    return dst


def compiled_layer_graphs(model: torch.nn.Module, ids: torch.Tensor, backward: bool = True, **inputs) -> int:
    """How many graphs the model's decoder layers trace into, each compiled as `--compile` does, over one bf16
    forward + backward on `ids`' device (expert groups unpadded, as on a GPU); the forward alone, without
    gradients, with `backward=False`. `inputs`: more model inputs (`position_ids`, `attention_mask`). The tracer
    decides the graphs, so the quick "eager" backend shows them. fla and causal-conv1d are asked for again
    afterwards."""
    from torch._dynamo.utils import counters

    from minillm.models.layers import moe
    from minillm.models.mini_qwen3_next import fla_kernels

    fla_kernels.clear_cache()
    torch._dynamo.reset()
    counters.clear()
    try:
        for layer in model.model.layers:
            layer.compile(backend="eager")
        with moe.force_moe_group_sizes("exact"), torch.autocast(ids.device.type, dtype=torch.bfloat16):
            if backward:
                model(input_ids=ids, labels=ids, **inputs).loss.backward()
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False, **inputs)
        return counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
        fla_kernels.clear_cache()
