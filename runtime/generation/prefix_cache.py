"""Prompt prefixes' KV cache for the generation engine: a prompt that starts as an earlier one did (a chat template's
system prompt, an earlier turn of the same conversation) is prefilled from where they part.

    prefixes = PrefixCache(max_bytes=64 << 20)
    hit = prefixes.lookup(ids)            # (arrays, n): the KV of ids[:n] for the longest known n, or None
    prefixes.store(ids, read)             # read(n): per cache tensor [kv_heads, n, head_dim], ids[:n]'s, from index 0

A decoder's cache at a position depends only on the tokens up to it, so the KV of a known prefix is what a prefill
would compute again (up to float rounding where it is moved to other cache indices). Prefixes are known in blocks of
BLOCK tokens, as vLLM's automatic prefix caching keeps them: a prompt stored once makes each of its block-aligned
prefixes known, keyed by a hash chained block by block (so a lookup costs one pass over the prompt) and checked
token by token on a hit. Least recently used prompts go first when the stored KV passes max_bytes.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

#: tokens per block: a prefix is known to the last whole block (SmolLM2's chat template: 24 of a question's ~36
#: prompt tokens are the same for every question, 3 blocks)
BLOCK = 8


def _block_hashes(ids: np.ndarray, blocks: int) -> list[int]:
    hashes, h = [], 0
    for b in range(blocks):
        h = hash((h, ids[b * BLOCK:(b + 1) * BLOCK].tobytes()))
        hashes.append(h)
    return hashes


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._prefixes: dict[int, tuple[int, int]] = {}    # block hash -> (entry, positions)
        self._entries: OrderedDict[int, tuple] = OrderedDict()  # entry -> (ids, arrays, hashes, bytes), LRU first
        self._next = 0
        self.bytes = 0
        self.hits = self.lookups = 0

    def lookup(self, ids: np.ndarray, limit: int | None = None) -> tuple[list[np.ndarray], int] | None:
        """The longest known block-aligned prefix of ids, at most `limit` positions: (arrays, n) whose first n
        positions are its KV, or None."""
        self.lookups += 1
        blocks = min(len(ids), len(ids) if limit is None else limit) // BLOCK
        for b, h in reversed(list(enumerate(_block_hashes(ids, blocks), 1))):
            found = self._prefixes.get(h)
            if found is None:
                continue
            entry, n = found
            stored, arrays = self._entries[entry][:2]
            if np.array_equal(stored[:n], ids[:n]):
                self._entries.move_to_end(entry)
                self.hits += 1
                return arrays, n
        return None

    def store(self, ids: np.ndarray, read) -> None:
        """Remember the KV of ids' whole blocks: read(n) -> per cache tensor [kv_heads, n, head_dim] (copied), called
        only when those blocks are not known already."""
        blocks = len(ids) // BLOCK
        if not blocks or self.max_bytes <= 0:
            return
        hashes = _block_hashes(ids, blocks)
        known = self._prefixes.get(hashes[-1])
        if known is not None and known[1] == blocks * BLOCK:
            self._entries.move_to_end(known[0])
            return
        n = blocks * BLOCK
        kept = [np.array(a[:, :n], copy=True) for a in read(n)]  # a copy always: the arrays may be views of live rows
        size = sum(a.nbytes for a in kept)
        if size > self.max_bytes:
            return
        entry, self._next = self._next, self._next + 1
        self._entries[entry] = (np.array(ids[:n]), kept, hashes, size)
        self.bytes += size
        for b, h in enumerate(hashes, 1):
            self._prefixes[h] = (entry, b * BLOCK)  # the newest prompt answers for its prefixes
        while self.bytes > self.max_bytes:
            self._evict()

    def clear(self) -> None:
        self._prefixes.clear()
        self._entries.clear()
        self.bytes = 0

    def _evict(self) -> None:
        """Drop the least recently used prompt; a prefix it answered for that another kept prompt shares (a chat
        template's start) is answered by the most recent of those from now on, not forgotten with it."""
        entry, (_, _, hashes, size) = self._entries.popitem(last=False)
        self.bytes -= size
        orphans = {h for h in hashes if self._prefixes.get(h, (None,))[0] == entry}
        for h in orphans:
            del self._prefixes[h]
        for other, (_, _, other_hashes, _) in reversed(self._entries.items()):  # most recent first
            if not orphans:
                break
            for b, h in enumerate(other_hashes, 1):
                if h in orphans:  # a chained hash: the same block count b, so the same prefix length
                    self._prefixes[h] = (other, b * BLOCK)
                    orphans.discard(h)
