"""Models by Hugging Face Hub id: "ORG/NAME" at a revision -> a local folder that onnxpipe loads (or exports).

    resolve_model("Xenova/distilbert-base-cased-distilled-squad")   # -> a model folder for pipeline()
    download_checkpoint("distilbert/distilbert-base-cased")         # -> a checkpoint folder for export_model()

A repo is one of three kinds, told apart by its file list:
- an onnxpipe export (it has onnxpipe.json): its files are downloaded and loaded as they are;
- a ready-made ONNX export (config.json and model.onnx, or onnx/model*.onnx as transformers.js keeps them):
  the graphs of the precision asked for are downloaded and imported (onnx_import.py), without torch;
- a PyTorch checkpoint (config.json and weights): exported on first use where the `export` extra is installed.

Downloads go through huggingface_hub (the `hub` extra) into its own cache, so HF_TOKEN, HF_ENDPOINT, HF_HUB_CACHE
(or HF_HOME) and HF_HUB_OFFLINE mean what they mean to transformers. The files are then hard-linked (or copied) into
a real folder under onnxpipe's cache, `$ONNXPIPE_HUB_CACHE` or ~/.cache/onnxpipe/hub/<org>--<name>/<commit>/<kind>/:
the Hub cache's snapshots are symlinks into its blobs/, and a model folder may hold no link that leaves it. Each such
folder is built beside its place and renamed into it, so it is there complete or not at all, and a later call (online
or offline) finds it by the commit its revision resolves to.

Every failure is a HubError: one line naming the repo and revision, what went wrong and what would make it work.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .folder_install import build_folder, link_or_copy

MANIFEST_NAME = "onnxpipe.json"
INSTALL_HINT = "pip install 'onnxpipe[hub]'"
# huggingface_hub's own rule for a repo id (validate_repo_id): NAME or ORG/NAME, at most 96 characters
_REPO_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# What an export needs of a checkpoint repo besides its weights (a model card, other frameworks' weights and
# ONNX files are left on the Hub).
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                    "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja",
                    "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")
# Weights, best first: safetensors (no pickle) over PyTorch .bin; one file or an index and its shards.
WEIGHT_FORMATS = (("model.safetensors", "model.safetensors.index.json", re.compile(r"^model-\d+-of-\d+\.safetensors$")),
                  ("pytorch_model.bin", "pytorch_model.bin.index.json", re.compile(r"^pytorch_model-\d+-of-\d+\.bin$")))
# Files of an ONNX repo that the import reads besides its graphs.
ONNX_REPO_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "modules.json", "sentence_bert_config.json",
                   "1_Pooling/config.json")


class HubError(ValueError):
    """A Hub id that could not be turned into a local folder; the message names the repo, the revision and the fix."""


class HubUnreachableError(HubError):
    """The Hub could not be asked (no connection, or HF_HUB_OFFLINE) and the cache does not hold what was needed."""


def is_repo_id(value) -> bool:
    """True for a string that can only mean a Hub repo: shaped as NAME or ORG/NAME, and no local path of that name."""
    return (isinstance(value, str) and len(value) <= 96 and bool(_REPO_ID.match(value)) and ".." not in value
            and "--" not in value and not value.startswith((".", "-")) and not os.path.exists(value))


def resolve_model(repo_id: str, *, task: str | None = None, revision: str | None = None, token=None,
                  precision: str = "fp32", trust_remote_code: bool = False) -> Path:
    """The model folder for `repo_id` at `revision` (default "main"): downloaded, imported or exported once, then
    found in onnxpipe's Hub cache by commit (offline too, once the revision's commit is known here).

    task: the pipeline task asked for (None: the repo's own). precision: fp32, int8 or int4 (an ONNX repo's
    model_quantized.onnx is int8, model_q4.onnx int4; a checkpoint is exported with that quantization).
    """
    from .task_table import export_task

    repo = locate(repo_id, revision, token)
    wanted = export_task(task) if task else "auto"
    kinds = {"onnxpipe": "onnxpipe", "onnx": f"import-{wanted}-{precision}",
             "checkpoint": f"export-{wanted}-{precision}"}
    for folder in kinds.values():  # a folder built earlier for this commit needs no file list and no download
        if (repo.cache_dir / folder / MANIFEST_NAME).exists():
            return repo.cache_dir / folder
    kind = repo.kind()
    dest = repo.cache_dir / kinds[kind]
    if kind == "onnxpipe":
        return _materialize_onnxpipe(repo, dest)
    if kind == "onnx":
        return _materialize_import(repo, dest, task, precision)
    return _export_checkpoint(repo, dest, wanted, precision, trust_remote_code)


def download_checkpoint(repo_id: str, *, revision: str | None = None, token=None,
                        trust_remote_code: bool = False) -> tuple[Path, dict]:
    """A checkpoint repo's config, weights (safetensors preferred over .bin) and tokenizer files, downloaded into the
    Hub cache: -> (its snapshot folder, {"repo_id", "revision", "commit"}) for export_model."""
    repo = locate(repo_id, revision, token)
    if repo.kind() == "onnxpipe":
        raise HubError(f"{repo.where} is already an onnxpipe model folder: pass it to pipeline(model=...) or "
                       "`onnxpipe serve --model` as it is")
    return repo.snapshot(repo.checkpoint_files(trust_remote_code)), repo.source


def import_repo(repo_id: str, out: str | os.PathLike, *, task: str | None = None, precisions: list[str] | None = None,
                revision: str | None = None, token=None) -> Path:
    """`onnxpipe import ORG/NAME --out MODEL_DIR`: a ready-made ONNX repo's graphs (of `precisions`, default every
    one onnxpipe runs) downloaded and written as an onnxpipe model folder at `out`."""
    from .onnx_import import PRECISION_SUFFIXES, OnnxImportError, import_onnx_folder

    repo = locate(repo_id, revision, token)
    kind = repo.kind()
    if kind != "onnx":
        raise HubError(f"{repo.where} holds no ONNX export (no model.onnx or onnx/model*.onnx beside a config.json)"
                       f"{': it is an onnxpipe model folder already' if kind == 'onnxpipe' else ''}; "
                       f"`onnxpipe export {repo_id} --out DIR` exports a checkpoint")
    names = [n for p in (precisions or PRECISION_SUFFIXES) for n in repo.onnx_files(p, required=bool(precisions))]
    precisions = precisions or [p for p in PRECISION_SUFFIXES if repo.onnx_files(p, required=False)]
    try:
        return import_onnx_folder(repo.snapshot(list(dict.fromkeys(names))), out, task=task, precisions=precisions,
                                  hub=repo.source, where=repo.where)
    except OnnxImportError as e:
        raise HubError(str(e)) from None


def resolve_serve_specs(specs, *, precision: str = "fp32") -> list[str]:
    """`onnxpipe serve --model [NAME=]TARGET[@TASK]` specs with each TARGET that is a Hub id replaced by its local
    folder, named after the repo unless a NAME is given; folders are left as they are."""
    from onnxpipe.server.config import split_model_spec

    resolved = []
    for spec in specs:
        name, target, task = split_model_spec(spec)
        if not is_repo_id(target):
            resolved.append(spec)
            continue
        folder = resolve_model(target, task=task, precision=precision)
        resolved.append(f"{name}={folder}{'@' + task if task else ''}")
    return resolved


def hub_cache_dir() -> Path:
    """$ONNXPIPE_HUB_CACHE, else $XDG_CACHE_HOME/onnxpipe/hub or ~/.cache/onnxpipe/hub."""
    if os.environ.get("ONNXPIPE_HUB_CACHE"):
        return Path(os.environ["ONNXPIPE_HUB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxpipe" / "hub"


@dataclass
class Repo:
    """One repo at one commit: its file list (the Hub's, or the cached snapshot's when offline) and its downloads."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[str, ...]
    token: object = None
    offline: str | None = None   # why the Hub is not asked (HF_HUB_OFFLINE, or it cannot be reached): the cache serves

    @property
    def where(self) -> str:
        return f"'{self.repo_id}' at revision '{self.revision}'"

    @property
    def source(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}

    @property
    def cache_dir(self) -> Path:
        return hub_cache_dir() / self.repo_id.replace("/", "--") / self.commit

    def kind(self) -> str:
        """onnxpipe, onnx or checkpoint; a HubError for a repo with none of what those need."""
        from .onnx_import import PRECISION_SUFFIXES, OnnxImportError, graph_files

        names = set(self.files)
        if MANIFEST_NAME in names:
            return "onnxpipe"
        graphs_error = None
        if "config.json" in names:
            for precision in PRECISION_SUFFIXES:  # usable graphs of any precision make it an ONNX repo
                try:
                    graph_files(names, precision, self.where)
                    return "onnx"
                except OnnxImportError as e:
                    graphs_error = graphs_error or e
            if self.weights():
                return "checkpoint"
        if graphs_error is not None and any(n.endswith(".onnx") for n in names):
            raise HubError(f"{graphs_error}{self._cache_note()}") from None
        listed = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "") or "no files"
        raise HubError(f"{self.where} has no usable files{self._cache_note()}: onnxpipe needs onnxpipe.json, or "
                       "config.json with model.onnx (or onnx/model*.onnx), or config.json with weights "
                       f"(model.safetensors or pytorch_model.bin) and tokenizer files; it has {listed}")

    def weights(self) -> list[str]:
        """The weight files an export downloads: safetensors when the repo has them, else PyTorch .bin."""
        names = set(self.files)
        for single, index, shard in WEIGHT_FORMATS:
            if single in names:
                return [single]
            if index in names:
                return [index] + sorted(n for n in names if shard.match(n))
        return []

    def checkpoint_files(self, trust_remote_code: bool) -> list[str]:
        names = set(self.files)
        if "config.json" not in names or not self.weights():
            raise HubError(f"{self.where} is not a transformers checkpoint: it needs config.json and weights "
                           f"(model.safetensors or pytorch_model.bin){self._cache_note()}")
        code = sorted(n for n in names if n.endswith(".py") and "/" not in n)
        if code and not trust_remote_code:
            config = self.download(["config.json"])[0]
            if '"auto_map"' in config.read_text(encoding="utf-8"):
                raise HubError(f"{self.where} brings its own model code ({', '.join(code)}, named by config.json's "
                               "auto_map), which onnxpipe does not run unless asked: pass --trust-remote-code "
                               "(trust_remote_code=True) if you trust this repo")
        return [n for n in CHECKPOINT_FILES if n in names] + self.weights() + (code if trust_remote_code else [])

    def onnx_files(self, precision: str, required: bool = True) -> list[str]:
        """The graphs of `precision` (with their external weights) and the files the import reads."""
        from .onnx_import import OnnxImportError, graph_files

        names = set(self.files)
        try:
            graphs = graph_files(names, precision, self.where)
        except OnnxImportError as e:
            if not required:
                return []
            raise HubError(f"{e}{self._cache_note()}") from None
        return graphs + [n for n in ONNX_REPO_FILES if n in names]

    def _cache_note(self) -> str:
        """Offline (or with the Hub unreachable) the file list is the Hub cache's: a file may be missing only there."""
        return f" (only what the Hub cache holds was looked at: {self.offline})" if self.offline else ""

    def download(self, names: list[str]) -> list[Path]:
        """Each file into the Hub cache (offline: from it); a cut download leaves no partial file there."""
        hf = _huggingface_hub(self.repo_id)
        paths = []
        for name in names:
            before = self._partial_downloads()
            try:
                paths.append(Path(hf.hf_hub_download(self.repo_id, name, revision=self.commit, token=self.token,
                                                     endpoint=_endpoint(), local_files_only=bool(self.offline))))
            except Exception as e:
                for partial in self._partial_downloads() - before:
                    partial.unlink(missing_ok=True)  # huggingface_hub keeps them to resume; nothing half-written stays
                from huggingface_hub.errors import LocalEntryNotFoundError

                if self.offline and isinstance(e, (LocalEntryNotFoundError, FileNotFoundError)):
                    raise HubUnreachableError(f"{self.where}, file {name}, is not in the Hub cache ({_hf_cache()}) "
                                              f"and {self.offline}: download it once while online") from None
                raise _hub_error(e, self.repo_id, self.revision, name) from None
        return paths

    def snapshot(self, names: list[str]) -> Path:
        """The files downloaded; -> the Hub cache's snapshot folder that holds them (links into its blobs/)."""
        paths = self.download(names)
        return paths[0].parents[len(Path(names[0]).parts) - 1]

    def _partial_downloads(self) -> set[Path]:
        from huggingface_hub import constants

        blobs = Path(constants.HF_HUB_CACHE) / f"models--{self.repo_id.replace('/', '--')}" / "blobs"
        return set(blobs.glob("*.incomplete")) if blobs.is_dir() else set()


def locate(repo_id: str, revision: str | None = None, token=None) -> Repo:
    """The commit `revision` names and the repo's files there: from the Hub, or, offline or when the Hub cannot be
    reached, from what was cached here before."""
    hf = _huggingface_hub(repo_id)
    from huggingface_hub import constants

    revision = revision or "main"
    unreachable = None
    offline = _offline()
    if not offline:
        try:
            # bounded like huggingface_hub's own metadata requests (HF_HUB_ETAG_TIMEOUT, 10 s): a network that drops
            # packets must not hang pipeline()
            info = hf.HfApi(endpoint=_endpoint(), token=token).model_info(
                repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except Exception as e:
            error = _hub_error(e, repo_id, revision)
            if not _is_connection_error(e):
                raise error from None
            unreachable = error
        else:
            _remember_commit(repo_id, revision, info.sha)
            return Repo(repo_id, revision, info.sha, tuple(s.rfilename for s in info.siblings or ()), token)
    commit = _cached_commit(repo_id, revision)
    if commit is None:
        if unreachable is not None:
            raise HubUnreachableError(f"{unreachable}; nothing of it is cached here and there is no local folder of "
                                      "that name: connect to the Hub (or set HF_ENDPOINT to a mirror), or download it "
                                      "once while online") from None
        raise HubUnreachableError(f"{_where(repo_id, revision)} is not in the Hub cache ({_hf_cache()}), "
                                  "HF_HUB_OFFLINE is set and there is no local folder of that name: unset "
                                  "HF_HUB_OFFLINE to download it, or download it once while online")
    why = "HF_HUB_OFFLINE is set (unset it to download the rest)" if offline else \
        f"the Hub at {_endpoint() or _default_endpoint()} cannot be reached"
    return Repo(repo_id, revision, commit, _cached_files(repo_id, commit), token, offline=why)


def _materialize_onnxpipe(repo: Repo, dest: Path) -> Path:
    """An onnxpipe repo as it is: its manifest, every file the manifest names, its tokenizer and configs."""
    import json

    snapshot = repo.snapshot([MANIFEST_NAME])
    try:
        manifest = json.loads((snapshot / MANIFEST_NAME).read_text(encoding="utf-8"))
        listed = [n for entry in manifest["files"].values() for e in entry.values()
                  for n in (e["path"], (e.get("external_data") or {}).get("path")) if n]
        listed.append((manifest.get("tokenizer") or {}).get("file") or "tokenizer.json")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HubError(f"{repo.where} has an onnxpipe.json that cannot be read ({type(e).__name__}: {e}): ask its "
                       "owner to export it again") from None
    unsafe = [n for n in listed if not isinstance(n, str) or not _inside_repo(n)]
    if unsafe:
        raise HubError(f"{repo.where} has an onnxpipe.json that names files outside the repo ({unsafe[0]!r}): "
                       "refused; ask its owner to export it again")
    names = set(repo.files)
    missing = [n for n in listed if n not in names]
    if missing and not repo.offline:  # offline, the download says what the cache lacks
        raise HubError(f"{repo.where} is an incomplete onnxpipe folder: its onnxpipe.json names {', '.join(missing)}, "
                       "which the repo does not have")
    kept = [n for n in ("config.json", "tokenizer_config.json", "special_tokens_map.json") if n in names]
    files = list(dict.fromkeys([*listed, *kept]))
    snapshot = repo.snapshot(files + [MANIFEST_NAME])
    return _install_links(snapshot, files + [MANIFEST_NAME], dest)


def _materialize_import(repo: Repo, dest: Path, task: str | None, precision: str) -> Path:
    from .onnx_import import OnnxImportError, import_onnx_folder

    snapshot = repo.snapshot(repo.onnx_files(precision))
    try:
        return import_onnx_folder(snapshot, dest, task=task, precisions=[precision], hub=repo.source, where=repo.where)
    except OnnxImportError as e:
        raise HubError(str(e)) from None


def _export_checkpoint(repo: Repo, dest: Path, task: str, precision: str, trust_remote_code: bool) -> Path:
    missing = [m for m in ("torch", "transformers", "optimum") if importlib.util.find_spec(m) is None]
    if missing:
        raise HubError(f"{repo.where} is a PyTorch checkpoint, not an ONNX export: exporting it on first use needs the "
                       f"export extra ({', '.join(missing)} missing): pip install 'onnxpipe[export]', or run "
                       f"`onnxpipe export {repo.repo_id} --out MODEL_DIR` where it is installed and pass that folder")
    from onnxpipe.export import export_model

    checkpoint = repo.snapshot(repo.checkpoint_files(trust_remote_code))
    quantize = None if precision == "fp32" else precision
    return export_model(checkpoint, dest, task, quantize=quantize, hub_source=repo.source,
                        trust_remote_code=trust_remote_code)


def _inside_repo(name: str) -> bool:
    """A repo file's path: relative, without '..' (a manifest from a stranger names the files to link)."""
    from pathlib import PurePosixPath

    pure = PurePosixPath(name)
    return bool(name) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in name


def _install_links(snapshot: Path, names: list[str], dest: Path) -> Path:
    def fill(folder: Path) -> None:
        for name in names:
            link_or_copy(snapshot / name, folder / name)

    return build_folder(dest, fill)


def _hub_error(e: Exception, repo_id: str, revision: str, file: str | None = None) -> HubError:
    """huggingface_hub's and requests' exceptions as one line naming the repo, the revision, the file and the fix."""
    from huggingface_hub import errors

    where = _where(repo_id, revision) + (f", file {file}" if file else "")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.LocalEntryNotFoundError):  # online, the Hub went away between the listing and the file
        return HubUnreachableError(f"{where}: the Hub at {_endpoint() or _default_endpoint()} stopped answering and "
                                   f"the file is not in the Hub cache ({_hf_cache()}): run again once it answers")
    if isinstance(e, errors.GatedRepoError) or status == 403:
        return HubError(f"{where}: access refused (403): the repo is gated or private and the token in HF_TOKEN (or "
                        "from `hf auth login`) may not read it; request access on its Hub page with that account")
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(f"{where}: the repo has no revision '{revision}' (404): pass a branch, tag or commit it has")
    if status == 401:
        return HubError(f"{where}: authentication needed (401): the repo is private or gated, or does not exist; set "
                        "HF_TOKEN to a token that may read it (or run `hf auth login`)")
    if isinstance(e, errors.EntryNotFoundError):
        return HubError(f"{where}: the repo lists this file but the Hub does not serve it (404): try again later, or "
                        "another revision")
    if isinstance(e, errors.RepositoryNotFoundError) or status == 404:
        return HubError(f"{where}: no such repo on the Hub (404), and no local folder of that name: check the id")
    if _is_connection_error(e):
        return HubUnreachableError(f"{where}: the Hugging Face Hub at {_endpoint() or _default_endpoint()} cannot be "
                                   f"reached ({_connection_reason(e)})")
    if _is_cut(e):
        read = re.search(r"IncompleteRead\(([^)]*)\)", str(e))
        return HubError(f"{where}: the download was cut off ({read.group(1) if read else _first_line(e)}); nothing of "
                        "it was kept: run again")
    return HubError(f"{where}: {type(e).__name__}: {_first_line(e)}")


def _is_connection_error(e: Exception) -> bool:
    import requests

    return isinstance(e, (requests.ConnectionError, requests.Timeout)) and not _is_cut(e)


def _connection_reason(e: Exception) -> str:
    """The socket's own words ("[Errno 111] Connection refused", a timeout) out of requests' nested retry message."""
    import requests

    if isinstance(e, requests.Timeout):
        return "timed out"
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", str(e))
    return found.group(0).strip() if found else _first_line(e)[:200]


def _is_cut(e: Exception) -> bool:
    """A response that ended before its Content-Length (or failed huggingface_hub's size check)."""
    import requests

    return isinstance(e, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)) or (
        isinstance(e, OSError) and "Consistency check failed" in str(e))


def _remember_commit(repo_id: str, revision: str, commit: str) -> None:
    """onnxpipe's own record of revision -> commit, so that its folders are found offline even without the Hub cache."""
    if revision == commit:
        return
    ref = hub_cache_dir() / repo_id.replace("/", "--") / "refs" / revision.replace("/", "%2F")
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}")
        tmp.write_text(commit)
        os.replace(tmp, ref)
    except OSError:
        pass  # only an offline shortcut: the Hub cache's own refs serve as well


def _cached_commit(repo_id: str, revision: str) -> str | None:
    if _COMMIT.match(revision):
        return revision
    refs = [Path(_hf_cache()) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision,
            hub_cache_dir() / repo_id.replace("/", "--") / "refs" / revision.replace("/", "%2F")]
    for ref in refs:
        if ref.is_file():
            return ref.read_text().strip()
    return None


def _cached_files(repo_id: str, commit: str) -> tuple[str, ...]:
    snapshot = Path(_hf_cache()) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
    if not snapshot.is_dir():
        return ()
    return tuple(sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()))


def _huggingface_hub(repo_id: str):
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(f"'{repo_id}' is no local folder, and as a Hugging Face Hub id it needs huggingface_hub: "
                       f"{INSTALL_HINT}") from None
    return huggingface_hub


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _endpoint() -> str | None:
    """HF_ENDPOINT as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _where(repo_id: str, revision: str) -> str:
    return f"'{repo_id}' at revision '{revision}'"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
