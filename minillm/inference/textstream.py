"""Token ids -> text, one token at a time, with stop strings.

Decoding each new token on its own is wrong for byte-level BPE: a character can span several tokens (the first ones
decode to U+FFFD) and some tokenizers merge spaces differently at the edges. So, like vLLM, we decode a short window
of recent tokens and emit only the text that grew past what the window's prefix already produced, holding back
anything that still ends in an incomplete character.

Stop strings are matched on the text, not on tokens (a stop string can start in the middle of a token). The text
that could still be the beginning of a stop string is held back until it is known not to be one, so a stream never
shows a part of a stop string that is then cut off.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"


class IncrementalText:
    """Builds the text of one generated sequence and tells when a stop string has appeared."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust decoder directly: with `clean_up_tokenization_spaces=False` transformers' `decode`
        # returns exactly its result, after several layers of Python that cost more than the decode (two per token).
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (cut at a stop string once one is found)
        self.emitted = 0  # how many characters of `text` were handed out
        self.stopped = False
        self._prefix = 0  # window start in `ids`
        self._read = 0  # end of the part of the window already turned into text

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def feed(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show (possibly "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The end of the sequence: return whatever was held back, less a character the end cut in the middle (a
        reply stopped by its token limit inside a multi-byte character ends at the last whole one, not in U+FFFD)."""
        if not self.stopped and self._read < len(self.ids):  # an incomplete character at the very end
            tail = self._decode(self.ids[self._prefix :])[
                len(self._decode(self.ids[self._prefix : self._read])) :
            ]
            self.text += tail.rstrip(_REPLACEMENT)
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.emitted - longest + 1)  # a stop string may begin inside already-emitted text
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        end = len(self.text)
        if self.stop and not self.stopped and not final:
            end -= self._held_back()
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
