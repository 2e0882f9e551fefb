"""Drafts without a draft model: continue the latest earlier occurrence of the sequence's suffix (prompt lookup,
as vLLM's `ngram` method and llama.cpp's lookup decoding do). Pure Python, no torch: it runs every iteration for
every running decode, so the search is a C-level `rfind` over the token ids as bytes, which `TokenBuffer` keeps per
request and extends by the new tokens only (converting 2k ids from a list costs ~70 us; the search ~5 us)."""

from __future__ import annotations

from array import array

ITEM = array("i").itemsize  # bytes a token id takes in the search buffer


class TokenBuffer:
    """A request's token ids as native ints in a bytearray, grown incrementally (token ids are only appended)."""

    __slots__ = ("data", "num_tokens")

    def __init__(self) -> None:
        self.data = bytearray()
        self.num_tokens = 0

    def sync(self, token_ids: list[int]) -> None:
        if len(token_ids) > self.num_tokens:
            self.data += array("i", token_ids[self.num_tokens:]).tobytes()
            self.num_tokens = len(token_ids)


def propose_ngram(buffer: TokenBuffer, k: int, min_n: int = 2, max_n: int = 4) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram (n from max_n down to
    min_n) of the buffer's tokens; [] if none occurs earlier.

    A match close to the end has fewer than k tokens after it; the proposal then repeats them, as the sequence
    would if the pattern went on (a loop of period d continues with the same d tokens)."""
    data, num_tokens = buffer.data, buffer.num_tokens
    if k < 1:
        return []
    for n in range(min(max_n, num_tokens - 1), min_n - 1, -1):
        start = _rfind_aligned(data, data[-n * ITEM:], (num_tokens - 1) * ITEM)
        if start is not None:
            follow = start + n  # the first token after the match, < num_tokens
            period = num_tokens - follow  # token i of the future is token i - period
            proposal = array("i", data[follow * ITEM:(follow + k) * ITEM]).tolist()
            while len(proposal) < k:
                proposal.append(proposal[len(proposal) - period])
            return proposal
    return []


def _rfind_aligned(data: bytearray, needle: bytearray, end: int) -> int | None:
    """The token index of the latest occurrence of `needle` ending at or before byte `end` that starts on a token
    boundary (a byte-level match may straddle two tokens)."""
    while True:
        found = data.rfind(needle, 0, end)
        if found < 0:
            return None
        if found % ITEM == 0:
            return found // ITEM
        end = found + len(needle) - 1  # look again, for one that starts earlier
