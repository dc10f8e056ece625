"""A local stand-in for an object store (Cloud Storage) at ``teststore://``, for the tests.

``teststore://bucket/a/b`` is the file ``$MTL_TEST_STORE_ROOT/bucket/a/b``. :func:`register`
makes it an fsspec filesystem (what :mod:`mtl_jax.paths` and TensorBoard's file layer use for
URLs) that behaves like gcsfs where the library depends on it:

* no appending: opening an object for appending (or for reading and writing) raises (gcsfs
  would silently *replace* the object, losing what it held);
* no rename: ``mv`` raises (Cloud Storage has no atomic rename);
* create-if-absent is atomic (``pipe_file(..., mode="create")`` with ``O_EXCL``, as gcsfs's
  upload with ``ifGenerationMatch=0``): of two creators one gets :class:`FileExistsError`.

Checkpoints: orbax reaches storage through ``etils.epath`` and tensorstore, which know only
their own schemes (gs://: their own Cloud Storage clients). :func:`register` also maps
``epath.Path("teststore://...")`` to the same local file, so the checkpoint bytes land in the
stand-in through orbax's local path handling; what orbax and tensorstore do on a real gs://
is not covered here (it is orbax's, unchanged by the library).

As a program: ``python tests/object_store.py ROOT <mtl-jax arguments>`` registers the
stand-in over the folder ROOT, then runs ``mtl-jax`` with the arguments.
"""

import os
import sys

import fsspec
from etils import epath
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "teststore"
ROOT_VARIABLE = "MTL_TEST_STORE_ROOT"


def local(url: str) -> str:
    """The local file behind ``teststore://...`` (or another ``proto://`` served by a subclass
    of :class:`StandInStore`); a path already local is returned as is."""
    url = os.fspath(url)
    if "://" in url:
        return os.path.join(os.environ[ROOT_VARIABLE], url.split("://", 1)[1].strip("/"))
    return url


class StandInStore(LocalFileSystem):
    """The fsspec filesystem of ``teststore://`` (module docstring)."""

    protocol = (PROTOCOL,)
    root_marker = "/"

    def __init__(self, **kwargs):
        super().__init__(auto_mkdir=True, **kwargs)  # an object needs no folders

    @classmethod
    def _strip_protocol(cls, path):
        path = local(fsspec.utils.stringify_path(path))
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"an object store cannot open {path} in mode {mode!r}")
        return super()._open(path, mode=mode, **kwargs)

    def mv(self, *args, **kwargs):
        raise NotImplementedError("an object store has no atomic rename")

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        if mode != "create":
            return super().pipe_file(path, value, mode=mode, **kwargs)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        return None


class _CheckpointPath(epath.gpath.PosixGPath):
    """``epath.Path("teststore://...")``: the local path of the same object (for orbax)."""

    def __new__(cls, *parts):
        return epath.Path(local(os.fspath(parts[0])), *parts[1:])


def register(root: str) -> None:
    """Serve ``teststore://`` from the folder ``root`` (module docstring)."""
    os.environ[ROOT_VARIABLE] = os.path.abspath(root)
    fsspec.register_implementation(PROTOCOL, StandInStore, clobber=True)
    epath.register_path_cls(f"{PROTOCOL}://")(_CheckpointPath)


if __name__ == "__main__":
    register(sys.argv[1])
    from mtl_jax.main import main

    sys.exit(main(sys.argv[2:]))
