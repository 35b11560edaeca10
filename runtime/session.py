"""One ONNX Runtime session: provider choice (CPU/CUDA) with a checked fallback, threads, named IO."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_warned: set[str] = set()


def parse_device(device) -> tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:1' | 1 (as transformers' device=) -> (kind, index)."""
    if device is None or device == -1:
        return "cpu", 0
    if isinstance(device, int):
        return "cuda", device
    text = str(device).lower()
    if text == "cpu":
        return "cpu", 0
    if text == "cuda" or text == "gpu":
        return "cuda", 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise ValueError(f"device={device!r} is not understood: use 'cpu', 'cuda' or 'cuda:N'")


@dataclass(frozen=True)
class SessionConfig:
    """How every ONNX Runtime session of a model is made: built once (by `pipeline()`, `ModelDir` or the server)
    and passed intact to each `Session`, so that no layer builds options of its own.

    device: 'cpu', 'cuda' or 'cuda:N'. intra_op_num_threads / inter_op_num_threads: None for ONNX Runtime's
    default (capped at this machine's CPU count, with a warning). allow_spinning: False makes the thread pool
    sleep between runs instead of spinning after each (a server wants its cores back for parsing and tokenizing);
    within a run its threads still spin between operators.
    cache: the session cache (CPU only): None takes $ONNXPIPE_SESSION_CACHE (a folder, or "off"), else the
    default folder for graphs of DEFAULT_CACHE_MIN_BYTES or more; a folder; False for none.
    provider_options: extra options for the CUDA provider (e.g. {"gpu_mem_limit": ...}).
    session_options: an `onnxruntime.SessionOptions` used as it is, for settings this object does not cover;
    then the other thread/spinning fields do not apply and the session cache is off (the cache key cannot
    tell whether such options fit a saved graph).
    """

    device: str | int | None = "cpu"
    intra_op_num_threads: int | None = None
    inter_op_num_threads: int | None = None
    allow_spinning: bool = True
    cache: object = None
    provider_options: dict | None = None
    session_options: object = None

    def __post_init__(self):
        parse_device(self.device)  # a clear ValueError now, not at the first session
        for name in ("intra_op_num_threads", "inter_op_num_threads"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
            cpus = os.cpu_count() or 1
            if value > cpus:  # more threads than cores only adds contention (and memory: a stack per thread)
                Session._warn_once(f"onnxpipe: {name}={value} is more than this machine's {cpus} CPUs; using {cpus}",
                                   stacklevel=4)
                object.__setattr__(self, name, cpus)
        if not isinstance(self.allow_spinning, bool):
            raise TypeError(f"allow_spinning must be True or False, got {self.allow_spinning!r}")
        if self.provider_options is not None and not isinstance(self.provider_options, dict):
            raise TypeError(f"provider_options must be a dict, got {type(self.provider_options).__name__}")

    @classmethod
    def of(cls, config: "SessionConfig | None" = None, **options) -> "SessionConfig":
        """`config` as it is, or one built from the keyword options that are not None (device=..., session_cache=...
        for `cache`, ...): the one way the convenience keywords of Session/ModelDir/pipeline become a config."""
        given = {k: v for k, v in options.items() if v is not None}
        if config is not None:
            if given:
                raise TypeError(f"pass either session_config or the separate session options ({', '.join(given)}), "
                                "not both")
            return config
        if "session_cache" in given:
            given["cache"] = given.pop("session_cache")
        return cls(**given)

    @property
    def kind(self) -> str:
        return parse_device(self.device)[0]

    def ort_options(self, ort):
        """The SessionOptions this config stands for (the given ones, as they are, when session_options is set)."""
        pool = shared_thread_pool()
        if self.session_options is not None:
            so = self.session_options
        else:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            if pool is None:
                on_process_pool(so, self.intra_op_num_threads)
                if self.inter_op_num_threads:
                    so.inter_op_num_threads = int(self.inter_op_num_threads)
            elif self.intra_op_num_threads and pool not in (0, self.intra_op_num_threads):
                Session._warn_once(f"onnxpipe: intra_op_num_threads={self.intra_op_num_threads} is ignored: this "
                                   f"process shares one ONNX Runtime thread pool of {pool} threads (share_thread_pool)")
            if not self.allow_spinning:
                # the threads stop spinning when a run returns, not between the operators of a run: never spinning
                # (session.*.allow_spinning=0) woke a sleeping thread at each parallel operator, which cost the
                # server 4-8% of SmolLM2's tokens/s at 8 clients and 15-25% of BERT-small's requests/s at one
                # (A/B here; only a 2-layer toy, whose whole run is shorter than a spin, lost: README, Load test)
                so.add_session_config_entry("session.force_spinning_stop", "1")
        if pool is not None:  # every session of the process runs on the one pool (share_thread_pool)
            so.use_per_session_threads = False
        return so

    def resolved_cache(self) -> tuple[Path | None, bool]:
        """(cache folder or None, whether it was asked for): None for CUDA and for given session_options."""
        if self.kind != "cpu" or self.session_options is not None:
            return None, False
        return resolve_session_cache(self.cache)


class Session:
    """Wraps `onnxruntime.InferenceSession`.

    Asking for CUDA where it cannot load (no GPU, CPU-only onnxruntime, missing CUDA
    libraries) warns once, saying why, and runs on CPU: `self.provider` and `self.device` tell which runs.

    Session(path, config) or Session(path, device=..., intra_op_num_threads=..., session_cache=...): the keyword
    options are SessionConfig's fields (session_cache for its `cache`). See _cached_session for the cache.
    """

    def __init__(self, path: str | os.PathLike, config: SessionConfig | None = None, *, device=None,
                 intra_op_num_threads: int | None = None, inter_op_num_threads: int | None = None,
                 session_options=None, session_cache=None, disabled_optimizers: tuple[str, ...] = ()):
        import onnxruntime as ort

        self.path = Path(path)
        self.config = SessionConfig.of(config, device=device, intra_op_num_threads=intra_op_num_threads,
                                       inter_op_num_threads=inter_op_num_threads, session_options=session_options,
                                       session_cache=session_cache)
        kind, index = parse_device(self.config.device)
        so = self.config.ort_options(ort)
        # ONNX Runtime graph optimizers the graph's export asks to leave off (manifest
        # optimization.runtime_disabled_optimizers: fusions it left out on purpose, which would otherwise come back
        # at load); given session_options are used as they are
        self.disabled_optimizers = tuple(disabled_optimizers) if self.config.session_options is None else ()
        if self.disabled_optimizers:
            so.add_session_config_entry("optimization.disable_specified_optimizers", ";".join(self.disabled_optimizers))
        #: the SessionOptions the session was created with
        self.options = so
        #: where the optimized, pre-packed graph this session loaded (or wrote) lives; None when not cached
        self.cached_from: Path | None = None
        #: whether it was loaded from an entry written before (rather than optimized and written now)
        self.cache_hit = False
        cache, explicit = self.config.resolved_cache()
        if cache is not None and not explicit and _weight_bytes(self.path) < DEFAULT_CACHE_MIN_BYTES:
            cache = None  # small graphs pre-pack in a few ms: not worth the disk
        if cache is not None:
            self._sess = self._cached_session(ort, so, cache, explicit)
            self._finish(kind, index, ort)
            return
        providers: list = ["CPUExecutionProvider"]
        if kind == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                self._warn_cpu(f"this onnxruntime build has no CUDAExecutionProvider (providers: {', '.join(available)}); "
                               "install onnxpipe[gpu] (onnxruntime-gpu) instead of onnxpipe[cpu]")
            else:
                cuda_options = {"device_id": index, **(self.config.provider_options or {})}
                providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
        self._sess = self._load(ort, str(self.path), so, providers)
        self._finish(kind, index, ort)

    def _load(self, ort, path: str, so, providers):
        try:
            return ort.InferenceSession(path, so, providers=providers)
        except Exception as e:  # a corrupt or truncated file
            raise ValueError(f"cannot load ONNX model {self.path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                             "export the model again") from None

    def _cached_session(self, ort, so, cache: Path, explicit: bool = True):
        """CPU only: the graph as ONNX Runtime optimized it for this CPU, with its weights already pre-packed for
        the MLAS kernels, saved on first load and loaded as it is afterwards (no re-optimizing, no re-packing:
        pre-packing is most of a session's creation, ~0.3 s for BERT-base's 340 MB, mostly page faults on the
        fresh memory it packs into).

        The entry is keyed by the source files (path, size, mtime), the onnxruntime version, this CPU's flags
        and the thread count, so an entry that would not fit is never loaded; writing one removes the entries
        of earlier versions of the same file. The saved weights take about twice the model's size on disk
        (original and pre-packed). A cache that cannot be written is skipped (with a warning when the folder
        was asked for) and the session is created as usual.
        """
        entry = cache / _entry_name(self.path, ort.__version__, so.intra_op_num_threads, self.disabled_optimizers)
        graph = entry / "model.onnx"
        providers = ["CPUExecutionProvider"]
        if graph.exists():
            # `so` is this session's own (no session_options were given): the saved graph is already optimized
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = _load_verified(ort, entry, so, providers)
            if sess is not None:
                self.cached_from, self.cache_hit = entry, True
                return sess
            shutil.rmtree(entry, ignore_errors=True)  # damaged (or written before checksums): rebuilt below
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            cache.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cache))
        except OSError as e:
            if explicit:
                self._warn_once(f"onnxpipe: session cache {cache} is not writable ({e}); loading without it")
            return self._load(ort, str(self.path), so, providers)
        so.optimized_model_filepath = str(scratch / "model.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        try:
            sess = self._load(ort, str(self.path), so, providers)
            try:
                (scratch / CHECKSUMS).write_text(json.dumps(_checksums(scratch)))
                os.replace(scratch, entry)
                self.cached_from = entry
            except OSError:  # another process wrote the same entry first
                pass
            _prune_stale_entries(cache, entry)
            return sess
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _finish(self, kind: str, index: int, ort) -> None:
        self.provider = self._sess.get_providers()[0]
        if kind == "cuda" and self.provider != "CUDAExecutionProvider" and "CUDAExecutionProvider" in ort.get_available_providers():
            self._warn_cpu("onnxruntime could not create the CUDAExecutionProvider (no GPU visible, or CUDA/cuDNN "
                           "libraries missing: install onnxruntime-gpu[cuda,cudnn])")
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.device_index = index if self.device == "cuda" else 0
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.inputs = {i.name: i for i in self._sess.get_inputs()}
        # on CPU the binding's own run: InferenceSession.run re-validates the input names in Python on every call
        # (~50 us, 1-2% of a decode step; run() has checked them). On CUDA its wrapper also falls back to CPU when
        # the provider fails at run time, so it is kept there.
        raw = getattr(self._sess, "_sess", None)
        self._run = raw.run if (self.device == "cpu" and raw is not None and hasattr(raw, "run")) else self._sess.run

    @staticmethod
    def _warn_once(message: str, stacklevel: int = 5) -> None:
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    def _warn_cpu(self, why: str) -> None:
        self._warn_once(f"CUDA was asked for but is not available: {why}. Running on CPU.", stacklevel=5)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run with the graph's own input names; extra feeds are dropped, missing ones are an error."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name} needs inputs {', '.join(missing)} (got {', '.join(feeds)}); "
                             "the manifest's io section lists them (docs/MANIFEST.md)")
        names = output_names or self.output_names
        try:
            values = self._run(names, {n: feeds[n] for n in self.input_names}, None)
        except Exception as e:
            raise run_error(self.path, e) from None
        return dict(zip(names, values))

    def io_binding(self):
        """ONNX Runtime IO binding, for keeping tensors (e.g. a KV cache) on the device between runs."""
        return self._sess.io_binding()

    def run_with_iobinding(self, binding) -> None:
        try:
            self._sess.run_with_iobinding(binding)
        except Exception as e:
            raise run_error(self.path, e) from None

    @property
    def ort_session(self):
        return self._sess


def run_error(path: Path, e: Exception) -> Exception:
    """ONNX Runtime's failure as one line naming the graph: InputRejected (a ValueError) when it refused the
    inputs, else ModelRunError; never its C++ traceback text."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    from .errors import InputRejected, ModelRunError

    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if isinstance(e, InvalidArgument) or "out of bounds" in first or "indices element" in first:
        return InputRejected(f"{path.name} refused its inputs: {first}")
    return ModelRunError(f"{path.name} failed to run: {first}")


_POOL: dict = {}


def share_thread_pool(threads: int | None = None) -> None:
    """Run every ONNX Runtime session this process creates from now on on one shared intra-op thread pool of
    `threads` threads (None: ONNX Runtime's default, one per physical core). Also set by
    ONNXPIPE_SHARED_THREADS=N before the first session.

    Each ONNX Runtime session otherwise owns a pool, and several pools in one process slow each other
    down: measured here (2 cores, a 576x49152 MatMul, four sessions taking turns 20 ms apart) 15 ms per run
    with a pool each against 6 ms with one shared pool, the time of a lone session. It pays when one process
    holds several models, or an encoder-decoder's three graphs. It is process-wide and one-way: afterwards
    ONNX Runtime refuses sessions with a pool of their own, so other code's sessions in the process must set
    `SessionOptions.use_per_session_threads = False` (onnxpipe's own do), and intra_op_num_threads no longer
    applies per session.
    """
    want = int(threads or 0)
    if _POOL.get("threads") is not None:
        if _POOL["threads"] != want:
            raise ValueError(f"this process already shares a thread pool of {_POOL['threads']} threads; it cannot "
                             f"be resized to {want}")
        return
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(want, 1)
    _POOL["threads"] = want


def on_process_pool(so=None, threads: int | None = None):
    """`so` (new SessionOptions when None) made fit for this process: on the shared pool when there is one,
    else with `threads` intra-op threads of its own. For code that creates its own
    `onnxruntime.InferenceSession` beside onnxpipe's."""
    if so is None:
        import onnxruntime as ort

        so = ort.SessionOptions()
    if shared_thread_pool() is not None:
        so.use_per_session_threads = False
    elif threads:
        so.intra_op_num_threads = int(threads)
    return so


def shared_thread_pool() -> int | None:
    """The shared pool's size (0: ONNX Runtime's default), or None when each session has its own."""
    if "env_checked" not in _POOL:
        _POOL["env_checked"] = True
        value = os.environ.get("ONNXPIPE_SHARED_THREADS", "").strip()
        if value:
            if not value.isdigit():
                raise ValueError(f"ONNXPIPE_SHARED_THREADS={value!r} is not a thread count: use a number (0: one per core)")
            share_thread_pool(int(value))
    return _POOL.get("threads")


#: the default cache (no session_cache= given, no ONNXPIPE_SESSION_CACHE) takes graphs of at least this many bytes
DEFAULT_CACHE_MIN_BYTES = 32 << 20
_OFF = ("0", "off", "false", "no", "none")


def default_session_cache_dir() -> Path:
    """$XDG_CACHE_HOME/onnxpipe/sessions, or ~/.cache/onnxpipe/sessions."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxpipe" / "sessions"


def resolve_session_cache(session_cache) -> tuple[Path | None, bool]:
    """(cache folder or None, whether it was asked for). session_cache: a folder; False (or "off") for none; None
    for $ONNXPIPE_SESSION_CACHE (a folder, or "off"), else the default folder (default_session_cache_dir)."""
    if session_cache is False:
        return None, True
    if session_cache is not None and session_cache is not True:
        if str(session_cache).strip().lower() in _OFF:
            return None, True
        return Path(session_cache), True
    env = os.environ.get("ONNXPIPE_SESSION_CACHE", "").strip()
    if env:
        return (None, True) if env.lower() in _OFF else (Path(env), True)
    return default_session_cache_dir(), False


# The entry's own record of what it wrote: a file damaged at the same size must not be loaded (its weights would
# give NaN or wrong results on every later load).
CHECKSUMS = "checksums.json"


def _load_verified(ort, entry: Path, so, providers):
    """The session of a cache entry, or None when the entry is damaged: its files' checksums are checked against
    the ones recorded when it was written. The check runs beside the session's creation (numpy releases the GIL),
    so it adds little to a cold start; the session is used only if it passes."""
    try:
        expected = json.loads((entry / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return None
    with ThreadPoolExecutor(1) as pool:
        actual = pool.submit(_checksums, entry)
        try:
            sess = ort.InferenceSession(str(entry / "model.onnx"), so, providers=providers)
        except Exception:
            return None
        return sess if actual.result() == expected else None


def _checksums(folder: Path) -> dict[str, str]:
    """Per file: the sum and the XOR of its 64-bit words, and its size. Any changed word changes them; it runs at
    memory speed (BERT-base's ~700 MB entry in ~0.1 s here, where CRC-32 took ~0.8 s), because the check is for
    damage, not for someone who can write the cache folder (they could write a matching record too). Read in
    chunks into one buffer: mapping the files would count the whole entry in the process's resident memory (a
    cached BERT-base start peaked at 950 MiB that way, 404 MiB without the cache)."""
    sums = {}
    buffer = bytearray(_CHECKSUM_CHUNK)
    for f in sorted(folder.iterdir()):
        if f.name == CHECKSUMS or not f.is_file():
            continue
        size = f.stat().st_size
        total = xor = 0
        tail = b""
        with open(f, "rb") as fh:  # buffered: readinto fills the buffer unless the file ends
            while True:
                n = fh.readinto(buffer)
                if not n:
                    break
                whole = n - n % 8  # only the file's last read can end inside a word
                words = np.frombuffer(buffer, dtype=np.uint64, count=whole // 8)
                total = (total + int(words.sum(dtype=np.uint64))) & 0xFFFF_FFFF_FFFF_FFFF  # the sum wraps, as numpy's
                xor ^= int(np.bitwise_xor.reduce(words)) if len(words) else 0
                tail = bytes(buffer[whole:n])
        sums[f.name] = f"{total:016x}{xor:016x}{tail.hex()}-{size}"
    return sums


#: bytes the checksum reads at a time (a multiple of 8: only the file's last read may end inside a word)
_CHECKSUM_CHUNK = 8 << 20


def _graph_files(path: Path) -> list[Path]:
    """The graph and its external-weights file (the export's `model.onnx.data`), those that exist."""
    return [f for f in (path, path.with_name(path.name + ".data")) if f.exists()]


def _weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in _graph_files(path))


def _entry_name(path: Path, ort_version: str, threads: int, disabled_optimizers: tuple[str, ...] = ()) -> str:
    """STEM-PATH-FILES-ENV: which file, which version of it, and what it was packed for (runtime, CPU, threads,
    optimizers left off)."""
    files = []
    for f in _graph_files(path):
        st = f.stat()
        files += [f.name, str(st.st_size), str(st.st_mtime_ns)]
    return "-".join([path.stem, _digest(str(path.resolve()), 8), _digest("\0".join(files), 8),
                     _digest("\0".join([ort_version, str(threads), _cpu_flags(), *disabled_optimizers]), 8)])


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _prune_stale_entries(cache: Path, entry: Path) -> None:
    """Remove the entries of earlier versions of the same model file (same stem and path, other files part)."""
    stem, path_part, files_part, _ = entry.name.rsplit("-", 3)
    for other in cache.iterdir():
        parts = other.name.rsplit("-", 3)
        if len(parts) == 4 and parts[:2] == [stem, path_part] and parts[2] != files_part and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def _cpu_flags() -> str:
    """The CPU's model and instruction-set flags: pre-packed weights are laid out for the kernels this CPU runs."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        import platform

        return platform.processor() or platform.machine()
