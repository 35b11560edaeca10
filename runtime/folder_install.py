"""Putting a finished model folder in place: built beside its target, then renamed, so that a reader never sees a
half-written folder and a failure leaves nothing that looks valid. Shared by the exporter, the ONNX importer and the
Hub cache."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def build_folder(out: Path, fill) -> Path:
    """`fill(folder)` writes the folder's files into a new hidden folder beside `out`, which then replaces `out`;
    if anything fails, nothing is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        fill(tmp)
        install_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def install_folder(tmp_out: Path, out: Path) -> None:
    """Move the finished folder into place (replacing an older one); the manifest was written last, so a half-copied
    folder has none."""
    os.chmod(tmp_out, 0o755)  # mkdtemp makes it 0700
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp_out, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_out, out)


def link_or_copy(src: Path, dst: Path) -> None:
    """A real file at dst with src's content: a hard link where the filesystem allows (no second copy of the weights),
    else a copy. Links are followed first: a Hugging Face cache snapshot is symlinks into its blobs/, and a model
    folder must hold its own files, not links that leave it."""
    real = Path(os.path.realpath(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(real, dst)
    except OSError:
        shutil.copyfile(real, dst)
