"""Turning next-token logits into a token: greedy, temperature, top-k, top-p and repetition penalty.

Notable choices:
- The processing order is HF's (repetition penalty -> temperature -> top-k -> top-p), so a setting means the same
  here as in `model.generate()`.
- `temperature == 0` means greedy (argmax), and so does any temperature below 1e-5; there is no `do_sample` flag.
- Randomness comes from a `torch.Generator` per sequence seeded from `SamplingParams.seed`, never from the global
  RNG: two requests served one after the other (or side by side) with the same seed get the same tokens, whatever
  else the process sampled in between.
- Repetition penalty uses a boolean "seen" table per row `(B, V)` that the decode loop keeps up to date, instead of
  gathering over the whole growing sequence every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# torch generators take 64-bit seeds; row i of a batch (and turn i of a chat) uses seed + i, so leave headroom.
MAX_SEED = 2**63 - 1024
MIN_SAMPLING_TEMPERATURE = 1e-5  # lower temperatures decode greedily (`SamplingParams.greedy`)
# A smaller penalty divides the logits it meets into infinities (1e-40 made them inf, and sampling failed); 0.01
# keeps even large logits finite. The same bound as `minillm chat --repetition-penalty`.
MIN_REPETITION_PENALTY = 0.01


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    `stop` holds strings that end the generation (not included in the output); `stop_token_ids` are extra token ids
    that end it besides the tokenizer's eos (they are not included either). `seed=None` draws a fresh seed.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty < MIN_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be >= {MIN_REPETITION_PENALTY}, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax decoding: no generator, top-p/top-k ignored, the seed irrelevant. So do
        temperatures below `MIN_SAMPLING_TEMPERATURE`, which sampling would turn into argmax anyway, and which
        would overflow the logits they divide (1e-40 makes them inf)."""
        return self.temperature < MIN_SAMPLING_TEMPERATURE


def ids_past_tokenizer(model: torch.nn.Module, tokenizer) -> list[int]:
    """Token ids the model can produce but the tokenizer does not know: the rows of an output head padded past the
    vocabulary (an imported model's embedding rounded up to a multiple of 64, say). Decoding drops them silently,
    so a reply could spend tokens on nothing; generation suppresses them. Empty for models trained with minillm."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return list(range(len(tokenizer), vocab)) if vocab else []


def make_generators(
    params: SamplingParams, batch_size: int, device: torch.device
) -> list[torch.Generator] | None:
    """One seeded generator per row (row i uses seed + i), or None for greedy decoding."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    gens = []
    for i in range(batch_size):
        g = torch.Generator(device=device)
        g.manual_seed(seed + i)
        gens.append(g)
    return gens


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the row: positive logits are divided, negative ones multiplied."""
    # logits: (B, V) float, seen: (B, V) bool
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the mass *before* it already reaches p; the top token is always kept, also when p is so
    # small (1e-300) that it rounds to 0 in the logits' dtype and the top token's mass before it (0) would reach it
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Pick the next token of every row.

    logits: (B, V) of the last position; seen: (B, V) bool of tokens already in each row (for the repetition
    penalty). Returns (B,) long.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = filter_top_k(logits, params.top_k)
    logits = filter_top_p(logits, params.top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    assert generators is not None and len(generators) == probs.shape[0], (
        "sampling needs one generator per row"
    )
    # one draw per row with its own generator: a row's tokens do not depend on its neighbours in the batch
    rows = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(rows)
