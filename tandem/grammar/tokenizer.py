"""tandem's tokenizer as llguidance sees it: every token's bytes, control tokens marked."""

from __future__ import annotations

import logging

import llguidance

from tandem.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class _Vocab:
    """What llguidance's TokenizerWrapper reads: token bytes (control tokens prefixed with 0xFF,
    llguidance's mark for "special, never produced by a grammar's text"), eos/bos and encode."""

    def __init__(self, tok: Tokenizer, n_vocab: int) -> None:
        self._tok = tok
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else (tok.eos_ids or (0,))[0]
        self.bos_token_id = tok.bos_id
        tokens = []
        special = []
        for i in range(tok.vocab_size):
            if tok.is_special(i) or tok.is_eog(i):
                tokens.append(b"\xff" + tok.id_to_piece(i).encode("utf-8", "replace"))
                special.append(i)
            else:
                tokens.append(tok.token_bytes(i))
        # The model's output head may be wider than the vocabulary: those ids never decode.
        tokens.extend(b"" for _ in range(n_vocab - len(tokens)))
        self.tokens = tokens
        self.special_token_ids = special

    def __call__(self, s: str) -> list[int]:
        return self._tok.encode(s, add_bos=False, add_eos=False, parse_special=False)


def ll_tokenizer(tok: Tokenizer, n_vocab: int | None = None) -> llguidance.LLTokenizer:
    """An LLTokenizer for ``tok`` whose EOS set is tandem's end-of-generation set (~1 s: cache it)."""
    n = max(n_vocab or 0, tok.vocab_size)
    wrapper = llguidance.TokenizerWrapper(_Vocab(tok, n))
    eos = list(tok.eos_ids) or [wrapper.eos_token_id]
    return llguidance.LLTokenizer(wrapper, n_vocab=n, eos_token=eos)
