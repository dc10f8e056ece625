"""The one path layer of the workdir's files: local paths, or URLs of an object store.

Every file a run reads or writes outside its checkpoints (``LOCK``, ``config.json``,
``config_changes.jsonl``, ``metrics.jsonl``, ``hparams.json``, ``results.json``,
``trivial_baseline.json``, the prediction pictures; ``compare`` and ``predict`` reading them
back) goes through these functions. A path containing ``://`` (``gs://bucket/run``) is a URL:
it is handled by the `fsspec <https://filesystem-spec.readthedocs.io>`_ filesystem registered
for its protocol (``gs``: ``gcsfs``, in the ``tpu`` extra). Any other path is a local path,
handled with ``os`` exactly as before this layer existed.

(``etils.epath``, which orbax uses for the checkpoints, knows only the ``gs``/``s3``/``az``/
``hf`` schemes, and goes through ``tf.io.gfile`` when TensorFlow is installed, which has no
create-if-absent; fsspec serves every protocol the same way and has one.) TensorBoard's event
files go through TensorBoard's own file layer, which uses fsspec for URLs too.

What differs on an object store: an object cannot be appended to or renamed atomically, but
each write replaces the whole object atomically. So :func:`append_text` rewrites the object,
:func:`write_text` writes it in one piece (no temporary file), and :func:`create_exclusive`
is the store's create-if-absent (on Cloud Storage, gcsfs sends the upload with the generation
precondition ``ifGenerationMatch=0``: of two runs creating the object at once, one gets HTTP
412 and :class:`FileExistsError`).
"""

from __future__ import annotations

import os
import posixpath
from typing import Any


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object-store URL (``proto://...``), not a local path."""
    return "://" in os.fspath(path)


def join(path: str | os.PathLike, *names: str) -> str:
    """``path/name/...``: ``/``-joined for a URL, ``os.path.join`` for a local path."""
    path = os.fspath(path)
    if is_url(path):
        return posixpath.join(path.rstrip("/") + "/", *names) if names else path
    return os.path.join(path, *names)


def parent(path: str | os.PathLike) -> str:
    """The folder holding ``path`` (a local path is made absolute)."""
    path = os.fspath(path)
    if is_url(path):
        head, _, _ = path.rstrip("/").rpartition("/")
        return head
    return os.path.dirname(os.path.abspath(path))


def _fs(path: str) -> tuple[Any, str]:
    """The fsspec filesystem of URL ``path`` and the path within it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as e:
        from mtl_jax.errors import UserError

        protocol = path.split("://", 1)[0]
        hint = (" (pip install 'mtl_jax[tpu]' installs gcsfs)" if protocol in ("gs", "gcs")
                else "")
        raise UserError(f"cannot use {path}: no filesystem for {protocol}:// ({e}){hint}") from e


def exists(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    fs.invalidate_cache()  # another process may have written it since (listing caches)
    return fs.exists(p)


def isdir(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    fs.invalidate_cache()
    return fs.isdir(p)


def makedirs(path: str | os.PathLike) -> None:
    """Create folder ``path`` and its parents (on an object store: nothing to create; it only
    checks that the store answers)."""
    path = os.fspath(path)
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``; :class:`FileNotFoundError` when there is no such file."""
    path = os.fspath(path)
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return fs.cat_file(p)


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a reader sees the old or the new content.

    Locally a temporary file next to it is renamed over it; on an object store the object is
    written in one piece (which the store makes atomic)."""
    path = os.fspath(path)
    if is_url(path):
        fs, p = _fs(path)
        fs.pipe_file(p, data)
        return
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (created if absent). An object cannot be appended to: it is
    read and written back whole."""
    path = os.fspath(path)
    if not is_url(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    try:
        old = read_text(path)
    except FileNotFoundError:
        old = ""
    write_text(path, old + text)


def create_exclusive(path: str | os.PathLike, data: bytes) -> None:
    """Create ``path`` holding ``data`` if no such file exists, atomically; raise
    :class:`FileExistsError` if one does. Local: ``O_CREAT | O_EXCL``, then ``fsync``; Cloud
    Storage: an upload with ``ifGenerationMatch=0`` (fsspec's ``mode="create"``)."""
    path = os.fspath(path)
    if is_url(path):
        fs, p = _fs(path)
        fs.pipe_file(p, data, mode="create")
        return
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # e.g. a full disk: leave no empty file behind
        os.remove(path)
        raise


def remove(path: str | os.PathLike) -> None:
    """Delete file ``path``; :class:`FileNotFoundError` when it is not there."""
    path = os.fspath(path)
    if not is_url(path):
        os.remove(path)
        return
    fs, p = _fs(path)
    fs.rm_file(p)


def mtime(path: str | os.PathLike) -> float:
    """Last modification of ``path`` (seconds since the epoch)."""
    path = os.fspath(path)
    if not is_url(path):
        return os.path.getmtime(path)
    fs, p = _fs(path)
    fs.invalidate_cache()
    modified = fs.modified(p)
    return modified.timestamp()
