"""The decode loop: prefill once, then one token per step from the model's own cache.

Two engines share one front end (`BaseEngine.stream`): stop tokens, stop strings, text deltas, `max_new_tokens`,
cancellation. They differ only in how they produce the next token of each row:

- `Engine` (ours): one prefill forward over the left-padded prompts (last position's logits only,
  `logits_to_keep=1`), then one step per token. For our three models a step is the model's decode fast path
  (`begin_decode` / `decode_step`, minillm/models/decode.py): the prefill's cache (K/V for Llama, the compressed
  MLA latent for DeepSeek, conv + recurrent states for Gated DeltaNet) moves into buffers preallocated for the
  whole decode and written in place, RoPE comes from a table, the padding mask is built once, and the step runs
  the same math as `forward` in a fraction of the small ops. Any other model (or `fast_path=False`) steps
  through `forward` with the cache it returned, skipping the attention mask when no row is padded. Either way
  the loop does none of `generate()`'s per-step bookkeeping (logits-processor lists, stopping-criteria lists,
  kwargs re-preparation, growing `input_ids` copies). On CUDA it queues the next step before waiting for the
  current tokens (`overlap`), so the GPU never idles while the host detokenizes and streams.
- `HFEngine`: `model.generate()` with a streamer, running in a helper thread (`--engine hf`); the reference our
  loop must match token for token under greedy decoding.

Left padding: rows are right-aligned so every row's next token sits in the last column; `position_ids` count only
real tokens (`cumsum(mask) - 1`), which is what `generate()` does too, so padded and unpadded rows decode alike.

Usage:
    engine = Engine(model, tokenizer)
    for events in engine.stream([prompt_ids], SamplingParams(max_new_tokens=64)):
        for ev in events:
            print(ev.text, end="", flush=True)
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from minillm.inference.sampling import SamplingParams, ids_past_tokenizer, make_generators, sample_next
from minillm.inference.textstream import IncrementalText
from minillm.tokenizer import stop_token_ids

FINISH_STOP = "stop"  # eos, a stop token or a stop string
FINISH_LENGTH = "length"  # max_new_tokens or the context window reached
FINISH_CANCELLED = "cancelled"  # the caller asked to stop (e.g. a client disconnected)


@dataclass
class StepEvent:
    """What one row produced in one step: its token (None on a stop or cancel), the new text (maybe ""), and,
    on its last event, why it finished."""

    row: int
    token_id: int | None
    text: str
    finish_reason: str | None = None


@dataclass
class Completion:
    """The whole result for one prompt."""

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        """Tokens generated (OpenAI's `usage.completion_tokens`); a stop token is not counted."""
        return len(self.token_ids)


def context_length(model: torch.nn.Module) -> int | None:
    """The model's context window in tokens (`max_position_embeddings`), or None when the config has none."""
    return getattr(model.config, "max_position_embeddings", None)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class BaseEngine:
    """Common front end: bookkeeping per row around a token producer (`_steps`) that subclasses provide."""

    name = "base"

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        # a chat turn ends at <|im_end|> even if the model's generation config forgot to say so
        stop = set(stop_token_ids(tokenizer))
        stop |= set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
        self.stop_token_ids = stop
        self.context_length = context_length(model)
        self.suppressed = ids_past_tokenizer(model, tokenizer)  # ids decoding would drop: never sampled

    # -- token producers -------------------------------------------------------------------------------------
    def _steps(self, prompts: list[list[int]], params: SamplingParams, max_new: int, done: list[bool]):
        """Yield, per step, the next token of every row (rows marked in `done` may get anything)."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------------------
    def max_new_tokens(self, prompts: list[list[int]], params: SamplingParams) -> int:
        """`params.max_new_tokens`, cut so the longest prompt plus its answer fits the context window."""
        longest = max(len(p) for p in prompts)
        if self.context_length is None:
            return params.max_new_tokens
        if longest >= self.context_length:
            raise ValueError(
                f"the prompt has {longest} tokens but the context window is {self.context_length} tokens"
            )
        return min(params.max_new_tokens, self.context_length - longest)

    def left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-align the prompts: (B, T) ids and (B, T) mask (1 = real token)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- front end -------------------------------------------------------------------------------------------
    def stream(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[StepEvent]]:
        """Generate for a batch of tokenized prompts, yielding each step's events as soon as they exist.

        Every row ends with exactly one event whose `finish_reason` is set. Closing the iterator early (or setting
        `cancel`) stops the decode at the next step.
        """
        batch = len(prompts)
        max_new = self.max_new_tokens(prompts, params)
        stop_ids = self.stop_token_ids | set(params.stop_token_ids)
        texts = [IncrementalText(self.tokenizer, params.stop) for _ in range(batch)]
        done = [False] * batch
        produced = [0] * batch
        steps = self._steps(prompts, params, max_new, done)
        try:
            for tokens in steps:
                if cancel is not None and cancel.is_set():
                    yield [StepEvent(r, None, "", FINISH_CANCELLED) for r in range(batch) if not done[r]]
                    break
                events = []
                for r, tok in enumerate(tokens):
                    if done[r]:
                        continue
                    if tok in stop_ids:
                        done[r] = True
                        events.append(StepEvent(r, None, texts[r].flush(), FINISH_STOP))
                        continue
                    produced[r] += 1
                    delta = texts[r].feed(tok)
                    reason = None
                    if texts[r].stopped:
                        reason = FINISH_STOP
                    elif produced[r] >= max_new:
                        reason = FINISH_LENGTH
                        delta += texts[r].flush()
                    done[r] = reason is not None
                    events.append(StepEvent(r, tok, delta, reason))
                yield events
                if all(done):
                    break
        finally:
            done[:] = [True] * batch
            steps.close()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Generate to the end; returns one `Completion` per prompt."""
        out = [Completion(prompt_tokens=len(p)) for p in prompts]
        for events in self.stream(prompts, params):
            for ev in events:
                c = out[ev.row]
                if ev.token_id is not None:
                    c.token_ids.append(ev.token_id)
                c.text += ev.text
                if ev.finish_reason is not None:
                    c.finish_reason = ev.finish_reason
        return out


class Engine(BaseEngine):
    """Our decode loop over the model's own cache (see the module docstring)."""

    name = "minillm"

    def __init__(
        self, model: torch.nn.Module, tokenizer, overlap: bool | None = None, fast_path: bool = True
    ) -> None:
        """`overlap` (default: on for CUDA) queues step t+1 on the GPU before step t's tokens reach the host.
        `fast_path` uses the model's `begin_decode` / `decode_step` when it has them (minillm/models/decode.py);
        False (or a model without them) decodes through `forward` with the cache it returns."""
        super().__init__(model, tokenizer)
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        # transformers 5.x names the argument `cache` (`past_key_values` is deprecated there); our models accept
        # both, a model written for older transformers only `past_key_values`
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.fast_path = fast_path and hasattr(model, "decode_step") and hasattr(model, "begin_decode")

    def _forward(self, ids, mask, pos, cache):
        kwargs = {self._cache_arg: cache}
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kwargs
        )
        new_cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        return out.logits[:, -1, :], new_cache  # (B, V)

    @torch.inference_mode()
    def _steps(self, prompts, params, max_new, done):
        ids, mask = self.left_pad(prompts)  # (B, T)
        batch, width = ids.shape
        padded = bool((mask == 0).any())
        # the mask of the whole decode, sliced as it grows: no torch.cat per step
        full_mask = torch.ones((batch, width + max_new), dtype=torch.long, device=self.device)
        full_mask[:, :width] = mask
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T): real tokens count from 0
        seen = None
        if params.repetition_penalty != 1.0:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            seen = torch.zeros((batch, vocab), dtype=torch.bool, device=self.device)
            real = mask.bool()
            rows = torch.arange(batch, device=self.device).unsqueeze(1).expand_as(ids)
            seen[rows[real], ids[real]] = True
        generators = make_generators(params, batch, self.device)
        batch_idx = torch.arange(batch, device=self.device)
        pad = torch.full((batch,), self.pad_id, dtype=torch.long, device=self.device)

        prefill_mask = full_mask[:, :width] if padded else None
        logits, cache = self._forward(ids, prefill_mask, pos, None)  # prefill
        next_pos = pos[:, -1:] + 1  # (B, 1)
        state = None  # the model's decode state (fast path)

        def advance(tok: torch.Tensor, step_mask: torch.Tensor | None) -> torch.Tensor:
            """Feed this step's tokens (B,); return the next logits (B, V)."""
            nonlocal cache, state
            if not self.fast_path:
                logits, cache = self._forward(tok.unsqueeze(1), step_mask, next_pos, cache)
                return logits
            if state is None:  # once the first token is out: the prefill's cache moves into preallocated buffers
                state = self.model.begin_decode(cache, width + max_new, prefill_mask)
                cache = None
            return self.model.decode_step(tok.unsqueeze(1), next_pos, state)

        for step in range(max_new):
            if self.suppressed:
                logits[:, self.suppressed[0] :] = float("-inf")  # the ids past the tokenizer (a contiguous tail)
            tok = sample_next(logits, params, seen, generators)  # (B,)
            if any(done):
                tok = torch.where(torch.tensor(done, device=self.device), pad, tok)
            if seen is not None:
                seen[batch_idx, tok] = True
            last = step == max_new - 1
            step_mask = full_mask[:, : width + step + 1] if padded else None
            if self.overlap:
                # copy the tokens out, then queue the next forward before waiting for the copy: the GPU computes
                # step t+1 while the host detokenizes and streams step t (at the end, one forward is wasted)
                host = tok.to("cpu", non_blocking=True)
                ready = torch.cuda.Event() if self.device.type == "cuda" else None
                if ready is not None:
                    ready.record()
                if not last:
                    logits = advance(tok, step_mask)
                if ready is not None:
                    ready.synchronize()
                yield host.tolist()
                if all(done) or last:
                    return
            else:
                yield tok.tolist()
                if all(done) or last:
                    return
                logits = advance(tok, step_mask)
            next_pos = next_pos + 1


class _QueueStreamer:
    """A `generate()` streamer that hands each step's tokens to a queue (the first call is the prompt: skipped)."""

    def __init__(self, q: queue.Queue) -> None:
        self.q = q
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.q.put(value.view(-1).tolist())

    def end(self) -> None:
        pass


class _StopDoneRows:
    """Stopping criterion: a row is finished when the front end marked it done (stop string, cancel)."""

    def __init__(self, done: list[bool]) -> None:
        self.done = done

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class HFEngine(BaseEngine):
    """`model.generate()` behind the same front end (`--engine hf`)."""

    name = "hf"

    def _steps(self, prompts, params, max_new, done):
        from transformers import GenerationConfig, StoppingCriteriaList

        ids, mask = self.left_pad(prompts)
        sampling = {}
        if not params.greedy:
            sampling = {
                "temperature": params.temperature,
                "top_p": params.top_p,
                # 0 = off. (None would not do: generate() fills a None with its own default, top-k 50.)
                "top_k": params.top_k,
            }
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=not params.greedy,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=sorted(self.stop_token_ids | set(params.stop_token_ids)),
            pad_token_id=self.pad_id,
            suppress_tokens=self.suppressed or None,
            **sampling,
        )
        q: queue.Queue = queue.Queue()
        finished = object()

        def run() -> None:
            try:
                # generate() samples from the global RNG: seed it for this call only, and give the caller its RNG
                # state back afterwards (a seeded request must not make the rest of the process deterministic).
                device = self.model.device
                cuda = [device.index or 0] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda, enabled=params.seed is not None), torch.inference_mode():
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=config,
                        streamer=_QueueStreamer(q),
                        stopping_criteria=StoppingCriteriaList([_StopDoneRows(done)]),
                    )
            except BaseException as err:  # re-raised in the consuming thread
                q.put(err)
            finally:
                q.put(finished)

        thread = threading.Thread(target=run, name="hf-generate", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is finished:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            done[:] = [True] * len(done)
            thread.join()


def make_engine(kind: str, model: torch.nn.Module, tokenizer) -> BaseEngine:
    """`kind` is "minillm" (our loop) or "hf" (`generate()`)."""
    if kind == "minillm":
        return Engine(model, tokenizer)
    if kind == "hf":
        return HFEngine(model, tokenizer)
    raise ValueError(f"unknown engine {kind!r}; choose 'minillm' or 'hf'")
