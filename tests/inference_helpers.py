"""Tiny models and a tiny tokenizer for the inference, chat and server tests (no downloads, no shared data).

The tokenizer is a byte-level BPE trained in a second on generated sentences with minillm's own trainer (so it has
the ChatML template and special tokens). Models: the three minillm architectures at a shrunken `tiny` preset, and a
tiny `transformers.LlamaForCausalLM` as a second, independent implementation to compare against.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = (
    "the cat dog bird sat ran flew on under over a mat tree house red blue green small big quickly slowly "
    "and then because while model token train data learn think answer question hello world"
).split()


def tiny_texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(n)
    ]


def build_tokenizer(out_dir: Path):
    from minillm.tokenizer import train_tokenizer

    return train_tokenizer(tiny_texts(), out_dir, vocab_size=320, min_frequency=1, show_progress=False)


def byte_bpe_tokenizer(texts: list[str], vocab_size: int, special_tokens: list[str], chat_template: str):
    """A byte-level BPE trained on `texts`, as a transformers fast tokenizer with `special_tokens` (the first is
    both eos and pad) and `chat_template`: for tests that pin their own template and specials instead of minillm's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=special_tokens[0],
        pad_token=special_tokens[0],
        additional_special_tokens=special_tokens[1:],
    )
    hf.chat_template = chat_template
    return hf


def our_model_names() -> list[str]:
    """The minillm architectures (an import error here fails the tests: there is no silent fallback)."""
    from minillm.models.registry import MODEL_NAMES

    return list(MODEL_NAMES)


def all_model_names() -> list[str]:
    return ["llama-hf", *our_model_names()]


def build_model(name: str, vocab_size: int, seed: int = 0, max_positions: int = 256) -> torch.nn.Module:
    """A randomly initialised tiny model: `llama-hf` (transformers' Llama) or one of ours."""
    torch.manual_seed(seed)
    if name == "llama-hf":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            eos_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    else:
        from minillm.models.registry import build_model as build

        model = build(name, "tiny", vocab_size=vocab_size, max_position_embeddings=max_positions)
    # random weights give near-uniform logits; a larger init spreads them so greedy picks are far from ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def save_model_dir(model, tokenizer, out_dir: Path) -> Path:
    """A HuggingFace model directory (what a run's `final/` holds)."""
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def printable_only(model, tokenizer) -> None:
    """Make greedy decoding emit only plain-text tokens: zero the output rows of every other token.

    Random weights otherwise produce control bytes and partial UTF-8 that a terminal test cannot compare, and
    special tokens (eos, <|im_end|>) that would end replies at random lengths. A zero logit never wins the argmax
    against a couple of hundred random ones.
    """
    keep = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text and text.isascii() and text.replace(" ", "").isalnum():
            keep.add(token_id)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight  # (V, D)
        for token_id in range(weight.shape[0]):
            if token_id not in keep:
                weight[token_id].zero_()


def chat_model_name() -> str:
    """The architecture the chat and server tests run on."""
    return "mini_llama3"


class ServerThread:
    """A uvicorn server for `app` on a free loopback port, in a background thread (always stop() it)."""

    def __init__(self, app) -> None:
        import socket
        import threading

        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ServerThread:
        import time

        self.thread.start()
        for _ in range(200):  # at most 10 s
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("the test server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
