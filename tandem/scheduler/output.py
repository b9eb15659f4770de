"""Turn sampled tokens into streamed text and decide when a sequence stops.

Stop strings may straddle token boundaries, so text that could still become the start of a
stop string is held back until the next token settles it; no client ever sees a stop string
or half of one.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.messages import FinishReason
from tandem.scheduler.sequence import Sequence
from tandem.tokenizer.detokenizer import IncrementalDetokenizer
from tandem.tokenizer.tokenizer import Tokenizer


@dataclass(slots=True)
class _Stream:
    detok: IncrementalDetokenizer
    held: str = ""  # decoded text not yet sent: may be the start of a stop string
    stops: tuple[str, ...] = ()
    max_stop: int = 0
    sent_chars: int = 0
    # Ids that end the sequence with "stop": the tokenizer's EOS ids (unless ignore_eos) and the
    # request's stop_token_ids. Both checks answer the same event, so one set does.
    stop_ids: frozenset[int] = frozenset()


@dataclass
class TokenEvent:
    text: str  # new text for the client (may be empty)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(tokenizer.eos_ids)
        self.context_length = context_length
        self._streams: dict[int, _Stream] = {}

    def _stream(self, seq: Sequence) -> _Stream:
        st = self._streams.get(seq.seq_id)
        if st is None:
            p = seq.params
            stops = tuple(p.stop)
            detok = IncrementalDetokenizer(
                self.tokenizer, seq.token_ids[: seq.prompt_len], skip_special=p.skip_special_tokens
            )
            stop_ids = frozenset(p.stop_token_ids)
            # A complete grammar allows only EOS: it ends the sequence even under ignore_eos.
            if not p.ignore_eos or p.grammar_kind:
                stop_ids |= self.eos_ids
            st = _Stream(
                detok, stops=stops, max_stop=max((len(s) for s in stops), default=0), stop_ids=stop_ids
            )
            self._streams[seq.seq_id] = st
        return st

    def on_token(self, seq: Sequence, token: int) -> TokenEvent:
        """``token`` was just appended to ``seq.token_ids``; what to send, and is it over?"""
        return TokenEvent(*self.advance(seq, token))

    def advance(self, seq: Sequence, token: int) -> tuple[str, str | None, str | int | None]:
        """`on_token` as a plain tuple ``(text, finish_reason, stop_reason)``: the scheduler loop
        calls this once per sequence per step, and most calls take the first return below."""
        st = self._streams.get(seq.seq_id)
        if st is None:
            st = self._stream(seq)
        if token in st.stop_ids:
            return self._drain(st), FinishReason.STOP, token
        n = len(seq.token_ids)
        if not st.stops:  # nothing is ever held back
            text = st.detok.push(token)
            if n - seq.prompt_len >= seq.max_tokens or n >= self.context_length:
                return text + st.detok.flush(), FinishReason.LENGTH, None
            return text, None, None
        before = len(st.held)
        st.held += st.detok.push(token)
        # Only the new text (plus what a stop string could reach back into) can hold a match.
        # Measured from where the new text starts: one token's text may be longer than any stop.
        window_start = max(0, before - st.max_stop + 1)
        hits = [(st.held.find(s, window_start), s) for s in st.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            idx, s = min(hits)
            text = st.held[:idx]
            st.held = ""
            return text, FinishReason.STOP, s
        if n - seq.prompt_len >= seq.max_tokens or n >= self.context_length:
            return self._drain(st, final=True), FinishReason.LENGTH, None
        keep = _holdback(st.held, st.stops)
        text = st.held[: len(st.held) - keep]
        st.held = st.held[len(st.held) - keep :]
        return text, None, None

    def _drain(self, st: _Stream, final: bool = True) -> str:
        text = st.held + (st.detok.flush() if final else "")
        st.held = ""
        return text

    def release(self, seq: Sequence) -> None:
        self._streams.pop(seq.seq_id, None)
