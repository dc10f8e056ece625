"""Input pipeline: prepared split -> grain -> sharded global ``jax.Array`` batches.

Training (:func:`train_iterator`): each process reads its own slice of the split
(``index % process_count == process_index``), shuffles it deterministically from the seed
(a new order every epoch), repeats forever, applies :class:`~mtl_jax.data.augment.JointAugment`
with a per-example generator derived from the seed and the example's position (so a restored
iterator augments exactly as before), batches ``global_batch_size // process_count`` examples
per process with drop-remainder, and assembles global batches sharded over the mesh axis
``data`` with ``jax.make_array_from_process_local_data``. A background thread prepares the
next batches while the current step runs. ``get_state()``/``set_state()`` save and restore
the position exactly.

Evaluation (:func:`eval_batches`): every example of the split exactly once, in order, no
augmentation; the last batches are padded with copies of a real example whose
``example_mask`` is 0, and every process yields the same number of batches.

Both decode each record with :func:`~mtl_jax.data.augment.decode`; ``normals_from_depth=True``
(``config.dataset.normals_from_depth``) makes it compute ``normals`` from ``depth`` and
``intrinsics`` at the stored resolution, before augmentation.

No TensorFlow is imported: records are read through ``tfds`` data sources (array_record).
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtl_jax.data.augment import JointAugment, decode
from mtl_jax.errors import UserError


class SplitTooSmallError(UserError, ValueError):
    """The training split has fewer examples than a process's batch (or than processes)."""

Batch = dict[str, Any]


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """Leading (batch) axis split over ``axis``, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(axis))


def local_batch_size(global_batch_size: int, mesh: Mesh, axis: str = "data") -> int:
    """Per-process batch size; checks that the global batch divides over devices/processes."""
    n_dev = mesh.shape[axis]
    n_proc = jax.process_count()
    if global_batch_size % n_dev:
        raise ValueError(f"global batch size {global_batch_size} must be divisible by the "
                         f"{n_dev} devices of mesh axis {axis!r}")
    if global_batch_size % n_proc:
        raise ValueError(f"global batch size {global_batch_size} must be divisible by the "
                         f"{n_proc} processes")
    return global_batch_size // n_proc


def to_global(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> Batch:
    """Process-local NumPy batch -> global ``jax.Array`` batch sharded by ``sharding``."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def host_train_dataset(source, *, local_batch_size: int, seed: int,
                       augment: JointAugment | None, process_index: int = 0,
                       process_count: int = 1, num_threads: int = 2,
                       prefetch_buffer_size: int = 4,
                       normals_from_depth: bool = False) -> grain.IterDataset:
    """The per-process training stream of NumPy batches (infinite)."""
    if len(source) < process_count:
        raise SplitTooSmallError(f"the training split of {len(source)} examples is smaller "
                                 f"than the {process_count} processes")
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) < local_batch_size:
        raise SplitTooSmallError(
            f"each process has {len(ds)} training examples, fewer than its batch size "
            f"{local_batch_size} (config.batch_size over {process_count} process(es)); lower "
            "config.batch_size or add data")
    ds = ds.seed(seed).shuffle().repeat(None).map(_decoder(normals_from_depth))
    if augment is not None:
        ds = ds.random_map(augment)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                prefetch_buffer_size=prefetch_buffer_size))


def _decoder(normals_from_depth: bool) -> Callable[[Mapping], dict]:
    if normals_from_depth:
        return functools.partial(decode, normals_from_depth=True)
    return decode


class ShardedIterator:
    """Turns a host iterator of NumPy batches into global ``jax.Array`` batches.

    A daemon thread keeps up to ``prefetch`` batches ready on the devices. ``get_state()``
    is the host iterator's state right after the last batch returned by ``next()`` (not after
    the prefetched ones), so that saving it and restoring with ``set_state`` continues with
    exactly the batch that would have come next.
    """

    _DONE = object()

    def __init__(self, host_iterator, sharding: NamedSharding, prefetch: int = 2):
        self._host = host_iterator
        self._sharding = sharding
        self._prefetch = max(1, prefetch)
        self._state = self._host.get_state()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def _worker(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                local = next(self._host)
                state = self._host.get_state()
                item = (to_global(local, self._sharding), state)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
        except StopIteration:
            q.put(self._DONE)
        except BaseException as e:  # surfaced to the consumer by __next__
            q.put(e)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._thread = threading.Thread(target=self._worker, args=(self._queue, self._stop),
                                        daemon=True, name="mtl_jax-prefetch")
        self._thread.start()

    def _shutdown(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread, self._queue = None, None

    def __iter__(self) -> ShardedIterator:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is self._DONE:
            self._shutdown()
            raise StopIteration
        if isinstance(item, BaseException):
            self._shutdown()
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable position (copy)."""
        return dict(self._state)

    def set_state(self, state: Mapping) -> None:
        """Continue from a position returned by :meth:`get_state`."""
        self._shutdown()
        self._host.set_state(dict(state))
        self._state = dict(state)

    def close(self) -> None:
        self._shutdown()


def train_iterator(source, *, global_batch_size: int, mesh: Mesh, seed: int,
                   augment: JointAugment | None = None, prefetch: int = 2,
                   num_threads: int = 2, axis: str = "data",
                   normals_from_depth: bool = False) -> ShardedIterator:
    """Infinite iterator of sharded global training batches; see the module docstring."""
    local_bs = local_batch_size(global_batch_size, mesh, axis)
    host = host_train_dataset(source, local_batch_size=local_bs, seed=seed, augment=augment,
                              process_index=jax.process_index(),
                              process_count=jax.process_count(), num_threads=num_threads,
                              normals_from_depth=normals_from_depth)
    return ShardedIterator(iter(host), batch_sharding(mesh, axis), prefetch=prefetch)


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int) -> int:
    """Batches every process yields so that all ``num_examples`` are covered."""
    local_bs = global_batch_size // process_count
    per_process = math.ceil(num_examples / process_count)
    return max(1, math.ceil(per_process / local_bs))


def _pad_and_stack(examples: list[dict], size: int) -> dict[str, np.ndarray]:
    padded = list(examples)
    while len(padded) < size:
        filler = dict(examples[0])
        filler["example_mask"] = np.float32(0.0)
        padded.append(filler)
    return {k: np.stack([np.asarray(ex[k]) for ex in padded]) for k in padded[0]}


def host_eval_batches(source, *, local_batch_size: int, process_index: int = 0,
                      process_count: int = 1, num_threads: int = 2,
                      transform: Callable[[dict], dict] | None = None,
                      normals_from_depth: bool = False
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Per-process NumPy eval batches (padded, masked); equal count on every process."""
    n_batches = num_eval_batches(len(source), local_batch_size * process_count, process_count)
    decode_fn = _decoder(normals_from_depth)
    ds = grain.MapDataset.source(source)[process_index::process_count].map(decode_fn)
    if transform is not None:
        ds = ds.map(transform)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))
    template = None
    for _ in range(n_batches):
        chunk = []
        for ex in it:
            chunk.append(ex)
            if len(chunk) == local_batch_size:
                break
        if chunk:
            template = chunk[0]
        else:  # this process ran out: a fully masked batch keeps processes in step
            if template is None:
                template = decode_fn(source[0])
            chunk = [dict(template, example_mask=np.float32(0.0))]
        yield _pad_and_stack(chunk, local_batch_size)


def eval_batches(source, *, global_batch_size: int, mesh: Mesh, axis: str = "data",
                 num_threads: int = 2, normals_from_depth: bool = False) -> Iterator[Batch]:
    """Every example of ``source`` exactly once, as sharded global batches with
    ``example_mask`` (1 real, 0 padding)."""
    local_bs = local_batch_size(global_batch_size, mesh, axis)
    sharding = batch_sharding(mesh, axis)
    for local in host_eval_batches(source, local_batch_size=local_bs,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(), num_threads=num_threads,
                                   normals_from_depth=normals_from_depth):
        yield to_global(local, sharding)
