"""The generation engine's batch cache: the running sequences' KV cache, one row each, which rows join and leave
between decode steps.

    rows = batch_cache(session, kv_cache, rotary, max_rows=16)
    logits = rows.join(input_ids, attention_mask)   # prompts prefilled together, appended as the last rows
    logits = rows.step(next_tokens)                 # one token for every row
    order = rows.remove([1, 3])                     # new row i holds what was row order[i]

Every row has the same number of cache positions (the batch's width): a shorter row is left-padded, its padding
masked by attention_mask. Two layouts:

- SlotCache, for exports whose past and present share one buffer (GroupQueryAttention on CPU): one buffer per
  cache tensor, [row slots, kv_heads, capacity, head_dim], kept for the batch's life (the slots double, up to
  max_rows, when more rows are running than they hold); the running rows are its first `rows` rows (a contiguous
  prefix, bound as is). A join prefills straight into the free rows after
  them and moves only those rows' positions to the batch's width; a leave moves the last rows into the freed
  ones; columns that only padding uses are trimmed when they are a quarter of the width (or the rotary tables
  would run out), so a leave or a join costs a few rows' copy, not the whole cache's (SmolLM2 at 8 rows: the
  rebuild this replaces took a fifth of the engine's time).
- CopyCache, for the others (plain attention, GPT-2, CUDA): the graph returns a new present every step anyway, so
  rows are gathered and concatenated as numpy arrays at each leave and join.

Moving positions: GroupQueryAttention rotates keys by their cache index, so a row whose positions move by d
columns has its keys rotated by d as well (q_m . k_n depends on m - n alone: the logits stay as they were, up
to float rounding). Other exports take positions from the mask and need nothing.

Memory: SlotCache holds slots x capacity positions per cache tensor, slots at most max_rows and at most twice
the most rows that ran together (capacity starts at the first prompt's width plus SHARED_HEADROOM and doubles
when the width needs it; the width is at most the longest running row plus a third of padding); it is freed when
the last row leaves. Slots for the rows that run, not max_rows at once: a lone request's join zeroed and touched
16 rows' worth (SmolLM2: 221 MB) and waited 20-40 ms for it before its prefill.
"""
from __future__ import annotations

import numpy as np

from .kv_cache import (SHARED_HEADROOM, DecoderStepper, bind_buffers, cache_dtype, decoder_feeds,
                       position_ids_from_mask, present_name, run_bound, zeroed_buffers)
from .prefix_cache import PrefixCache

#: leading columns that only padding uses are trimmed once they are this many and a quarter of the width
TRIM_MIN = 16


class Rotary:
    """RoPE tables of an export whose keys are rotated by cache index (GroupQueryAttention): moving a row's
    positions by d columns rotates its keys by d."""

    def __init__(self, cos: np.ndarray, sin: np.ndarray, interleaved: bool):
        self.cos, self.sin, self.interleaved = cos, sin, interleaved
        self.positions = cos.shape[0]

    def moved(self, keys: np.ndarray, by: int) -> np.ndarray:
        """[..., positions, head_dim] keys rotated as if `by` positions later (earlier when negative)."""
        cos, sin = self.cos[abs(by)], self.sin[abs(by)] * (1 if by > 0 else -1)
        if self.interleaved:
            x1, x2 = keys[..., 0::2], keys[..., 1::2]
            out = np.empty_like(keys)
            out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            return out
        half = keys.shape[-1] // 2
        x1, x2 = keys[..., :half], keys[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(keys.dtype)


def rotary_tables(model) -> Rotary | None:
    """The export's Rotary where its keys are rotated by cache index, None for others; an export fused so without
    its tables (an older onnxpipe's) cannot move a cache: a clear error."""
    fused = ((model.manifest.get("optimization") or {}).get("fused_ops") or {}).get("GroupQueryAttention")
    if not fused:
        return None
    rotary = model.manifest["kv_cache"].get("rotary")
    if not rotary:
        raise ValueError(f"model dir '{model.path}' has GroupQueryAttention without its rotary tables "
                         "(kv_cache.rotary): export it again with this onnxpipe for continuous batching")
    tables = np.load(model.path / rotary["file"])
    return Rotary(tables["cos"].astype(np.float32), tables["sin"].astype(np.float32), bool(rotary["interleaved"]))


def batch_cache(session, kv_cache: dict, rotary: Rotary | None, max_rows: int, prefix_cache_bytes: int = 0):
    """The layout the export allows; prefix_cache_bytes: the KV of known prompt prefixes kept at most (SlotCache)."""
    shared = kv_cache.get("shared_buffer") and getattr(session, "device", "cpu") != "cuda"
    if shared:
        return SlotCache(session, kv_cache, rotary, max_rows, prefix_cache_bytes)
    return CopyCache(session, kv_cache, rotary)


def left_pad(array: np.ndarray, width: int, axis: int) -> np.ndarray:
    missing = width - array.shape[axis]
    if missing <= 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (missing, 0)
    return np.pad(array, pad)


def _kept(rows: int, leaving: list[int]) -> list[int]:
    """New row -> old row after `leaving` go, the last staying rows moved into the freed places (the fewest
    moves; a row's order in the batch means nothing)."""
    gone = set(leaving)
    order = [i for i in range(rows) if i not in gone]
    stay = len(order)
    movers = iter(i for i in range(stay, rows) if i not in gone)
    return [i if i < stay and i not in gone else next(movers) for i in range(stay)]


class SlotCache:
    def __init__(self, session, kv_cache: dict, rotary: Rotary | None, max_rows: int, prefix_cache_bytes: int = 0):
        self.session, self.rotary, self.max_rows = session, rotary, int(max_rows)
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.prompt_tokens = self.cached_tokens = 0     # prompts' tokens joined, and those a known prefix gave
        self.past_names = list(kv_cache["past_names"])
        self.present_names = [present_name(n) for n in self.past_names]
        self.is_key = [n.endswith(".key") for n in self.past_names]
        self.dtype = cache_dtype(session, self.past_names[0], kv_cache)
        self.num_kv_heads, self.head_dim = int(kv_cache["num_kv_heads"]), int(kv_cache["head_dim"])
        self.fed = [n for n in session.input_names if n not in set(self.past_names)]
        self.buffers: list[np.ndarray] = []            # per past name: [slots, kv_heads, capacity, head_dim]
        self.attention_mask = np.zeros((0, 0), np.int64)
        self._binding = None                            # the running rows' (the first `rows`), until they change

    @property
    def rows(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def width(self) -> int:
        return self.attention_mask.shape[1]

    def join(self, prompts: list[np.ndarray]) -> np.ndarray:
        """Prefill prompts (1-D ids) into the rows after the running ones, each from where its longest known prefix
        ends; -> [len(prompts), vocab] logits of their last positions.

        A call feeds each of its rows its last S tokens (S: the longest part not known), on top of a past of P
        columns in which each row's known prefix ends, right-aligned: each row's tokens stay contiguous (left
        padding only), which rotary keys rotated by cache index need. GroupQueryAttention takes a past under a
        prompt of several tokens for one row only: a prompt with a known prefix is prefilled on its own, the
        others together."""
        k, width, m = self.rows, self.width, len(prompts)
        if k + m > self.max_rows:
            raise ValueError(f"{k + m} rows asked of a batch cache of {self.max_rows}")
        hits = [self.prefixes.lookup(ids, limit=len(ids) - 1) if self.prefixes else None for ids in prompts]
        calls, start = [], 0   # (first prompt, prompts) of each session call: a known prefix alone, the rest together
        for i, hit in enumerate(hits + [True]):
            if hit is not None:
                calls += [(start, i - start)] if i > start else []
                calls += [(i, 1)] if i < m else []
                start = i + 1
        plans = [self._plan(prompts[i:i + n], hits[i:i + n]) for i, n in calls]
        new_width = max(width, *(plan[2] for plan in plans))
        self._reserve(new_width + 1, k + m)
        logits = np.concatenate([self._prefill(k + i, prompts[i:i + n], hits[i:i + n], plan)
                                 for (i, n), plan in zip(calls, plans)])
        for (i, n), (_, _, w) in zip(calls, plans):  # every row's positions end at the batch's last column
            if w < new_width:
                self._move(slice(k + i, k + i + n), 0, w, new_width - w)
        if k and width < new_width:
            self._move(slice(0, k), 0, width, new_width - width)
        mask = np.stack([left_pad(np.ones(len(ids), np.int64), new_width, 0) for ids in prompts])
        self.attention_mask = np.concatenate([left_pad(self.attention_mask, new_width, 1), mask], axis=0)
        self._binding = None
        return logits

    @staticmethod
    def _plan(prompts: list[np.ndarray], hits: list) -> tuple[int, list[int], int]:
        """-> (tokens fed per row S, each row's known positions used, the call's width P + S)."""
        fed = max(len(ids) - (hit[1] if hit else 0) for ids, hit in zip(prompts, hits))
        past = [max(len(ids) - fed, 0) for ids in prompts]
        return fed, past, max(past) + fed

    def _prefill(self, first_row: int, prompts: list[np.ndarray], hits: list, plan) -> np.ndarray:
        fed, past, w = plan
        p = w - fed
        self.prompt_tokens += sum(len(ids) for ids in prompts)
        self.cached_tokens += sum(past)
        for row, (hit, known) in enumerate(zip(hits, past), first_row):
            if known:  # the known prefix into the row's past, ending at column p
                for buf, array, is_key in zip(self.buffers, hit[0], self.is_key):
                    block = array[:, :known]
                    moved = is_key and p > known and self.rotary is not None
                    buf[row, :, p - known:p] = self.rotary.moved(block, p - known) if moved else block
        ids = np.stack([left_pad(ids[known:], fed, 0) for ids, known in zip(prompts, past)])
        mask = np.stack([left_pad(np.ones(len(ids), np.int64), w, 0) for ids in prompts])
        rows = slice(first_row, first_row + len(prompts))
        binding = bind_buffers(self.session, self.past_names, self.present_names, [b[rows] for b in self.buffers])
        logits = run_bound(self.session, binding, self.fed, decoder_feeds(ids, mask, position_ids_from_mask(mask)[:, p:]))
        if self.prefixes is not None:  # the row's positions are read (keys rotated back) only for a prompt not known
            for row, ids in enumerate(prompts, first_row):
                self.prefixes.store(ids, lambda n, row=row, start=w - len(ids): self._positions(row, start, n))
        return np.array(logits[:, -1, :], dtype=np.float32)

    def _positions(self, row: int, start: int, length: int) -> list[np.ndarray]:
        """A row's cache at columns [start, start + length) as it would be from column 0 (keys rotated back)."""
        out = []
        for buf, is_key in zip(self.buffers, self.is_key):
            block = buf[row, :, start:start + length]
            out.append(self.rotary.moved(block, -start) if is_key and start and self.rotary is not None else block)
        return out

    def step(self, next_tokens: np.ndarray) -> np.ndarray:
        """One token for every running row; -> [rows, vocab] logits."""
        if self.rotary is not None and self.width + 1 > self.rotary.positions:
            self._trim(force=True)  # padding columns count as cache indices: keep them inside the tables
        k = self.rows
        self._reserve(self.width + 1, k)
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((k, 1), np.int64)], axis=1)
        if self._binding is None:
            self._binding = bind_buffers(self.session, self.past_names, self.present_names,
                                         [b[:k] for b in self.buffers])
        feeds = decoder_feeds(next_tokens.reshape(k, 1).astype(np.int64), self.attention_mask,
                              position_ids_from_mask(self.attention_mask)[:, -1:])
        logits = run_bound(self.session, self._binding, self.fed, feeds)
        return np.array(logits[:, -1, :], dtype=np.float32)

    def remove(self, leaving: list[int]) -> list[int]:
        """Drop rows; -> new row -> old row. The last staying rows move into the freed places; the buffers are freed
        when no row is left."""
        order = _kept(self.rows, leaving)
        width = self.width
        for new, old in enumerate(order):
            if new != old:
                for buf in self.buffers:
                    buf[new, :, :width] = buf[old, :, :width]
        self.attention_mask = self.attention_mask[order]
        self._binding = None
        if not order:
            self.buffers, self.attention_mask = [], np.zeros((0, 0), np.int64)
        else:
            self._trim()
        return order

    def _trim(self, force: bool = False) -> None:
        """Drop leading columns that only padding uses: when they are TRIM_MIN and a quarter of the width (moving
        every row costs about a step's cache read; a few padded columns cost the attention little), or when forced."""
        unused = int(np.argmax(self.attention_mask.any(axis=0)))
        if unused and (force or (unused >= TRIM_MIN and 4 * unused >= self.width)):
            self._move(slice(0, self.rows), unused, self.width - unused, -unused)
            self.attention_mask = self.attention_mask[:, unused:]

    def _move(self, rows: slice, start: int, length: int, by: int) -> None:
        """Positions [start, start + length) of `rows` to [start + by, ...), keys rotated by `by` where needed."""
        for buf, is_key in zip(self.buffers, self.is_key):
            block = buf[rows, :, start:start + length]
            moved = self.rotary.moved(block, by) if is_key and self.rotary is not None else block.copy()
            buf[rows, :, start + by:start + by + length] = moved

    def _reserve(self, width: int, rows: int) -> None:
        """Buffers with room for `width` positions and `rows` rows (allocated, or grown keeping the running rows:
        positions double, slots double up to max_rows)."""
        slots, capacity = (self.buffers[0].shape[0], self.buffers[0].shape[2]) if self.buffers else (0, 0)
        if width <= capacity and rows <= slots:
            return
        if width > capacity:
            capacity = width + SHARED_HEADROOM if not capacity else max(2 * capacity, width)
        if rows > slots:
            slots = min(self.max_rows, max(rows, 2 * slots))
        shape = (slots, self.num_kv_heads, capacity, self.head_dim)
        grown = zeroed_buffers(len(self.past_names), shape, self.dtype)
        for old, buf in zip(self.buffers, grown):
            buf[:self.rows, :, :self.width] = old[:self.rows, :, :self.width]
        self.buffers, self._binding = grown, None


class CopyCache:
    def __init__(self, session, kv_cache: dict, rotary: Rotary | None):
        self.session, self.kv_cache, self.rotary = session, kv_cache, rotary
        self._batch: DecoderStepper | None = None
        self.prompt_tokens = self.cached_tokens = 0

    @property
    def rows(self) -> int:
        return 0 if self._batch is None else self._batch.attention_mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self._batch is None else self._batch.attention_mask.shape[1]

    def join(self, prompts: list[np.ndarray]) -> np.ndarray:
        """Prefill prompts (1-D ids) together, left-padded to the longest, then merge them into the batch."""
        width = max(len(ids) for ids in prompts)
        input_ids = np.stack([left_pad(ids, width, 0) for ids in prompts])
        attention_mask = np.stack([left_pad(np.ones(len(ids), np.int64), width, 0) for ids in prompts])
        stepper = DecoderStepper(self.session, self.kv_cache, shared_buffer=False)
        logits = stepper.prefill(input_ids, attention_mask)
        self.prompt_tokens += sum(len(ids) for ids in prompts)
        if self._batch is None:
            self._batch = stepper
            return logits
        old, new = self.width, stepper.attention_mask.shape[1]
        width = max(old, new)
        mask = np.concatenate([left_pad(self._batch.attention_mask, width, 1),
                               left_pad(stepper.attention_mask, width, 1)], axis=0)
        batch_cache, new_cache = self._moved(self._batch.presents(), width - old), self._moved(stepper.cache, width - new)
        self._set(mask, {n: np.concatenate([left_pad(v, width, 2), left_pad(new_cache[n], width, 2)], axis=0)
                         for n, v in batch_cache.items()})
        return logits

    def step(self, next_tokens: np.ndarray) -> np.ndarray:
        return self._batch.step(next_tokens)

    def remove(self, leaving: list[int]) -> list[int]:
        gone = set(leaving)
        order = [i for i in range(self.rows) if i not in gone]
        if not order:
            self._batch = None
            return order
        index = np.array(order)
        mask = np.take(self._batch.attention_mask, index, axis=0)
        cache = {n: np.take(v, index, axis=0) for n, v in self._batch.presents().items()}
        # columns only padding uses (the longest sequence left): trimmed, so the cache shrinks with the batch
        unused = int(np.argmax(mask.any(axis=0)))
        if unused:
            mask = mask[:, unused:]
            cache = self._moved({n: v[:, :, unused:] for n, v in cache.items()}, -unused)
        self._set(mask, cache)
        return order

    def _set(self, mask: np.ndarray, cache: dict) -> None:
        batch = DecoderStepper(self.session, self.kv_cache, shared_buffer=False)
        batch.attention_mask = np.ascontiguousarray(mask)
        batch.cache = {n: np.ascontiguousarray(v) for n, v in cache.items()}
        self._batch = batch

    def _moved(self, cache: dict, by: int) -> dict:
        if self.rotary is None or by == 0:
            return cache
        return {n: self.rotary.moved(v, by) if n.endswith(".key") else v for n, v in cache.items()}
