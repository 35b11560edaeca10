"""KV-cache steppers: the prompt in one pass, then one token per step, `present.*` fed back as `past_key_values.*`.

`DecoderStepper` drives a decoder-only export (role "model"); `Seq2SeqStepper` an encoder-decoder
export (roles "encoder", "decoder", "decoder_with_past"). Both expose the same small surface to
the search strategies:

    logits = stepper.prefill(...)        # [batch, vocab] for the last position
    logits = stepper.step(next_tokens)   # [batch] new ids -> [batch, vocab]
    stepper.reorder(beam_idx)            # beam search: gather the cache rows
    stepper.step_input_lengths           # input_ids length fed at each run: [prompt_len, 1, 1, ...]

On CUDA (Session.device == "cuda") the cache stays on the device through IO binding: each step
binds the previous run's `present.*` OrtValues as the next run's `past_key_values.*`.

A merged decoder (`decoder_model_merged.onnx`, as older transformers.js repos ship them: one graph that holds both the
first-step and the with-past decoder behind an If on a `use_cache_branch` input) is fed that flag, false for the first
run and true after, with an empty cache (past length 0) for the first run, as transformers.js feeds it. Feeds a graph
does not take are dropped by Session.run, so the other exports are fed as before.

On CPU, an export whose manifest says kv_cache.shared_buffer (GroupQueryAttention, export/graph/shared_kv_buffer.py)
keeps each cache tensor in one numpy buffer [batch, kv_heads, capacity, head_dim] bound as both its
past and its present: the graph appends the new position in place instead of copying the whole cache
into a new present every step. The capacity starts at the prompt plus SHARED_HEADROOM positions and
doubles when a step needs more.
"""
from __future__ import annotations

import numpy as np


def present_name(past_name: str) -> str:
    return "present." + past_name[len("past_key_values."):]


# ONNX Runtime's input type names -> numpy dtypes, for the cache the graph takes
_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def cache_dtype(session, past_name: str, kv_cache: dict) -> np.dtype:
    """The cache's element type as the session's graph takes it: the manifest's kv_cache.dtype describes the fp32
    graph, and an fp16 export's *.fp16.onnx takes (and returns) a float16 cache."""
    arg = (getattr(session, "inputs", None) or {}).get(past_name)
    ort_type = getattr(arg, "type", None)
    if ort_type in _ORT_FLOAT_TYPES:
        return np.dtype(_ORT_FLOAT_TYPES[ort_type])
    return np.dtype(kv_cache.get("dtype") or "float32")


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """As transformers' prepare_inputs_for_generation: cumsum - 1, padded positions set to 1."""
    position_ids = np.cumsum(attention_mask, axis=-1, dtype=np.int64) - 1
    position_ids[attention_mask == 0] = 1
    return position_ids


class _Runner:
    """Runs one session with the cache either as numpy arrays (CPU) or as device OrtValues (CUDA)."""

    def __init__(self, session):
        self.session = session
        self.on_device = getattr(session, "device", "cpu") == "cuda"

    def run(self, feeds: dict, cache_feeds: dict, cache_outputs: list[str]) -> tuple[np.ndarray, dict]:
        """-> (logits as numpy, {present name: cache value}); cache values are OrtValues on CUDA."""
        if not self.on_device:
            out = self.session.run({**feeds, **cache_feeds}, ["logits", *cache_outputs])
            return out["logits"], {n: out[n] for n in cache_outputs}
        import onnxruntime as ort

        binding = self.session.io_binding()
        index = self.session.device_index
        for name in self.session.input_names:
            value = cache_feeds.get(name)
            if value is None:
                value = feeds[name]
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", index)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in cache_outputs:
            binding.bind_output(name, "cuda", index)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        names = ["logits", *cache_outputs]
        out = dict(zip(names, values))
        return out["logits"].numpy(), {n: out[n] for n in cache_outputs}

    def take(self, value, index: np.ndarray):
        """Gather cache rows (beam reordering, or expanding a batch)."""
        if not self.on_device:
            return np.take(value, index, axis=0)
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np.take(value.numpy(), index, axis=0)), "cuda",
                                                self.session.device_index)


#: positions a shared cache buffer holds beyond the prompt before it is first grown (SmolLM2 at batch 1:
#: 7.5 MB for 256 positions)
SHARED_HEADROOM = 256


def zeroed_buffers(count: int, shape: tuple, dtype) -> list[np.ndarray]:
    """`count` zeroed C-contiguous arrays of `shape`, views of one allocation. One block, not one array per cache
    tensor: glibc serves a freed size from its heap afterwards (its mmap threshold rises to the largest block
    freed, up to 32 MB), and zeroing heap memory is a memset of every byte: SmolLM2's 60 x 3.7 MB tensors (16 rows)
    took 4-90 ms that way. A block above 32 MB always comes from mmap as untouched zero pages (211 MB: ~0.05 ms);
    a smaller one may still be a memset (13 MB, one row: 0.5-2 ms), which is why the engine's slots follow the
    rows that run (batch_cache.py)."""
    return list(np.zeros((count, *shape), dtype))


class _SharedBuffers:
    """One numpy buffer per cache tensor, bound (ONNX Runtime IO binding) as both past_key_values.* and present.*."""

    def __init__(self, session, past_names, present_names, num_kv_heads: int, head_dim: int, dtype):
        self.session, self.past_names, self.present_names = session, past_names, present_names
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        # the inputs fed each run: the graph's, less the bound cache
        self.fed = [n for n in session.input_names if n not in set(past_names)]
        self.buffers: dict[str, np.ndarray] = {}
        self.binding = None

    def allocate(self, batch: int, capacity: int) -> None:
        shape = (batch, self.num_kv_heads, capacity, self.head_dim)
        self.buffers = dict(zip(self.past_names, zeroed_buffers(len(self.past_names), shape, self.dtype)))
        self._bind()

    def ensure(self, length: int) -> None:
        capacity = next(iter(self.buffers.values())).shape[2]
        if length <= capacity:
            return
        while capacity < length:
            capacity *= 2
        first = next(iter(self.buffers.values()))
        grown = zeroed_buffers(len(self.buffers), first.shape[:2] + (capacity,) + first.shape[3:], self.dtype)
        for new, old in zip(grown, self.buffers.values()):
            new[:, :, :old.shape[2]] = old
        self.buffers = dict(zip(self.buffers, grown))
        self._bind()

    def take(self, index: np.ndarray) -> None:
        self.buffers = {n: np.take(b, index, axis=0) for n, b in self.buffers.items()}
        self._bind()

    def _bind(self) -> None:
        self.binding = bind_buffers(self.session, self.past_names, self.present_names,
                                    [self.buffers[past] for past in self.past_names])

    def run(self, feeds: dict) -> np.ndarray:
        return run_bound(self.session, self.binding, self.fed, feeds)


def bind_buffers(session, past_names: list[str], present_names: list[str], arrays: list[np.ndarray]):
    """An IO binding with each (C-contiguous) array as both its past_key_values.* input and its present.* output:
    the graph appends the new positions in place. Logits come back as a new CPU array."""
    binding = session.io_binding()
    binding.bind_output("logits", "cpu")
    for past, present, buf in zip(past_names, present_names, arrays):
        binding.bind_input(past, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        binding.bind_output(present, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
    return binding


def run_bound(session, binding, fed: list[str], feeds: dict) -> np.ndarray:
    """Run a binding from bind_buffers with the step's other inputs (fed: the graph's inputs that are not bound);
    -> the logits output as the graph gives it."""
    for name in fed:
        value = feeds.get(name)
        if value is None:
            raise ValueError(f"{session.path.name} needs input {name}, which onnxpipe's decoder loop does "
                             "not feed (the manifest's io section lists the graph's inputs)")
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    session.run_with_iobinding(binding)
    # the C vector, not get_outputs(): that wraps every output (60 bound present.* tensors of SmolLM2) in a Python
    # OrtValue at each step for the one output read (71 against 1.5 us a step; ~1% of SmolLM2's int8 step)
    return binding.get_outputs_as_ortvaluevector()[0].numpy()


def decoder_feeds(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                  logits_to_keep: int = 1) -> dict:
    """A decoder-only export's inputs for one run, less the cache: logits_to_keep (where the export has it) skips the
    LM head for all but the last positions; use_cache_branch tells a merged decoder whether there is a past."""
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "logits_to_keep": np.array([logits_to_keep], dtype=np.int64),
            "use_cache_branch": np.array([attention_mask.shape[1] > input_ids.shape[1]])}


class DecoderStepper:
    """logits_to_keep: fed as the export's logits_to_keep input (where it has one): the LM head runs for the last
    this many positions of a run, 0 for all of them (export validation compares them all with torch's).
    shared_buffer: use the export's shared KV buffer where it has one (kv_cache.shared_buffer, CPU)."""

    def __init__(self, session, kv_cache: dict, logits_to_keep: int = 1, shared_buffer: bool = True):
        self.runner = _Runner(session)
        self.session = session
        self.past_names = list(kv_cache["past_names"])
        self.present_names = [present_name(n) for n in self.past_names]
        self.dtype = cache_dtype(session, self.past_names[0], kv_cache)
        self.num_kv_heads = int(kv_cache["num_kv_heads"])
        self.head_dim = int(kv_cache["head_dim"])
        self.step_input_lengths: list[int] = []
        self.cache: dict = {}
        self.attention_mask: np.ndarray | None = None
        self.logits_to_keep = int(logits_to_keep)
        #: the last run's logits output as the graph gave it: [batch, positions kept, vocab]
        self.logits: np.ndarray | None = None
        self.shared = None
        # shared_buffer=False: the cache as separate past/present arrays even where the export could share one
        # buffer (the generation engine moves rows between batches)
        if shared_buffer and kv_cache.get("shared_buffer") and not self.runner.on_device:
            self.shared = _SharedBuffers(session, self.past_names, self.present_names, self.num_kv_heads,
                                         self.head_dim, self.dtype)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        batch = input_ids.shape[0]
        self.attention_mask = attention_mask.astype(np.int64)
        if self.shared is not None:
            self.shared.allocate(batch, input_ids.shape[1] + SHARED_HEADROOM)
            return self._run(input_ids, position_ids_from_mask(self.attention_mask), None)
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), dtype=self.dtype)
        cache_feeds = {name: empty for name in self.past_names}
        return self._run(input_ids, position_ids_from_mask(self.attention_mask), cache_feeds)

    def step(self, next_tokens: np.ndarray) -> np.ndarray:
        batch = next_tokens.shape[0]
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((batch, 1), np.int64)], axis=1)
        position_ids = position_ids_from_mask(self.attention_mask)[:, -1:]
        if self.shared is not None:
            self.shared.ensure(self.attention_mask.shape[1])
            return self._run(next_tokens.reshape(batch, 1).astype(np.int64), position_ids, None)
        cache_feeds = {past: self.cache[present] for past, present in zip(self.past_names, self.present_names)}
        return self._run(next_tokens.reshape(batch, 1).astype(np.int64), position_ids, cache_feeds)

    def presents(self) -> dict[str, np.ndarray]:
        """The cache after the last run as numpy arrays, {present.* name: [batch, kv_heads, positions, head_dim]}."""
        if self.shared is not None:  # the buffers hold capacity positions, the first attention_mask length in use
            length = self.attention_mask.shape[1]
            return {present: self.shared.buffers[past][:, :, :length]
                    for past, present in zip(self.past_names, self.present_names)}
        return {name: value.numpy() if self.runner.on_device else value for name, value in self.cache.items()}

    def unfed_inputs(self) -> list[str]:
        """The graph's inputs this stepper has nothing to feed: it cannot drive an export that has any."""
        fed = {"input_ids", "attention_mask", "position_ids", "logits_to_keep", "use_cache_branch", *self.past_names}
        return [name for name in self.session.input_names if name not in fed]

    def reorder(self, beam_idx: np.ndarray) -> None:
        if self.shared is not None:
            self.shared.take(beam_idx)
        else:
            self.cache = {name: self.runner.take(value, beam_idx) for name, value in self.cache.items()}
        self.attention_mask = np.take(self.attention_mask, beam_idx, axis=0)

    def _run(self, input_ids, position_ids, cache_feeds) -> np.ndarray:
        self.step_input_lengths.append(int(input_ids.shape[1]))
        feeds = decoder_feeds(input_ids, self.attention_mask, position_ids, self.logits_to_keep)
        if self.shared is not None:
            self.logits = self.shared.run(feeds)
            return np.array(self.logits[:, -1, :], dtype=np.float32)
        self.logits, self.cache = self.runner.run(feeds, cache_feeds, self.present_names)
        return np.array(self.logits[:, -1, :], dtype=np.float32)


class Seq2SeqStepper:
    """Encoder once; role "decoder" for the first decoder token, then "decoder_with_past"."""

    def __init__(self, model_dir, kv_cache: dict):
        self.encoder = model_dir.session("encoder")
        self.decoder = _Runner(model_dir.session("decoder"))
        self.decoder_with_past = _Runner(model_dir.session("decoder_with_past"))
        past = list(kv_cache["past_names"])
        self.self_past = [n for n in past if ".encoder." not in n]
        self.cross_past = [n for n in past if ".encoder." in n]
        self.dtype = cache_dtype(self.decoder_with_past.session, past[0], kv_cache)
        self.heads = {"self": int(kv_cache["num_kv_heads"]),
                      "cross": int(kv_cache.get("encoder_num_kv_heads") or kv_cache["num_kv_heads"])}
        self.head_dim = int(kv_cache["head_dim"])
        self.step_input_lengths: list[int] = []
        self.cache: dict = {}
        self.encoder_hidden_states = None
        self.encoder_attention_mask = None

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        out = self.encoder.run({"input_ids": input_ids, "attention_mask": attention_mask}, ["last_hidden_state"])
        self.encoder_hidden_states = out["last_hidden_state"]
        self.encoder_attention_mask = attention_mask.astype(np.int64)

    def expand(self, times: int) -> None:
        """Repeat each encoder row `times` (beams / return sequences), as transformers' repeat_interleave."""
        self.encoder_hidden_states = np.repeat(self.encoder_hidden_states, times, axis=0)
        self.encoder_attention_mask = np.repeat(self.encoder_attention_mask, times, axis=0)

    def prefill(self, decoder_input_ids: np.ndarray) -> np.ndarray:
        self.step_input_lengths.append(int(decoder_input_ids.shape[1]))
        feeds = {"input_ids": decoder_input_ids.astype(np.int64), "encoder_attention_mask": self.encoder_attention_mask,
                 "encoder_hidden_states": self.encoder_hidden_states, "use_cache_branch": np.array([False])}
        outputs = [present_name(n) for n in self.self_past + self.cross_past]
        logits, self.cache = self.decoder.run(feeds, self._empty_cache(decoder_input_ids.shape[0]), outputs)
        return np.array(logits[:, -1, :], dtype=np.float32)

    def step(self, next_tokens: np.ndarray) -> np.ndarray:
        batch = next_tokens.shape[0]
        self.step_input_lengths.append(1)
        feeds = {"input_ids": next_tokens.reshape(batch, 1).astype(np.int64),
                 "encoder_attention_mask": self.encoder_attention_mask,
                 "encoder_hidden_states": self.encoder_hidden_states, "use_cache_branch": np.array([True])}  # merged
        cache_feeds = {n: self.cache[present_name(n)] for n in self.self_past + self.cross_past}
        outputs = [present_name(n) for n in self.self_past]
        logits, new_self = self.decoder_with_past.run(feeds, cache_feeds, outputs)
        self.cache.update(new_self)  # cross-attention K/V do not change after the first step
        return np.array(logits[:, -1, :], dtype=np.float32)

    def _empty_cache(self, batch: int) -> dict:
        """Past length 0 for the first decoder run: what a merged decoder's first-step branch is fed (and ignores);
        none for a decoder_model.onnx, which takes no past."""
        if self.self_past[0] not in self.decoder.session.input_names:
            return {}
        shape = {kind: (batch, heads, 0, self.head_dim) for kind, heads in self.heads.items()}
        return {n: np.zeros(shape["cross" if n in self.cross_past else "self"], self.dtype)
                for n in self.self_past + self.cross_past}

    def unfed_inputs(self) -> dict[str, list[str]]:
        """{role: the graph's inputs this stepper has nothing to feed}: it cannot drive an export that has any."""
        cache = {*self.self_past, *self.cross_past}
        decoder = {"input_ids", "encoder_attention_mask", "encoder_hidden_states", "use_cache_branch"}
        fed = {"encoder": (self.encoder, {"input_ids", "attention_mask"}),
               "decoder": (self.decoder.session, {*decoder, *cache}),
               "decoder_with_past": (self.decoder_with_past.session, {*decoder, *cache})}
        return {role: [n for n in session.input_names if n not in names] for role, (session, names) in fed.items()}

    def reorder(self, beam_idx: np.ndarray) -> None:
        self.cache = {name: self.decoder.take(value, beam_idx) for name, value in self.cache.items()}
        self.encoder_hidden_states = np.take(self.encoder_hidden_states, beam_idx, axis=0)
        self.encoder_attention_mask = np.take(self.encoder_attention_mask, beam_idx, axis=0)
