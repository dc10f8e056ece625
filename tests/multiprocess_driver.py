"""Child process of tests/test_multiprocess.py: runs ``mtl-jax`` with its data reads recorded.

Usage: ``python tests/multiprocess_driver.py RECORD.jsonl -- <mtl-jax arguments>``.

Before calling :func:`mtl_jax.main.main`, it wraps the training iterator's ``__next__`` and
``pipeline.eval_batches`` so that every batch this process *consumed* is appended to
``RECORD.jsonl`` as the SHA-1 of each of its local example images (with the example mask for
evaluation batches). The test reads these records to check which examples each process read.
Nothing else of the library is changed.
"""

import hashlib
import json
import sys

import numpy as np


def _local_rows(array) -> list[np.ndarray]:
    """The rows of a global batch that live on this process, in global order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start in seen:
            continue
        seen.add(start)
        rows.extend(np.asarray(shard.data))
    return rows


def _digest(row: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(row).tobytes()).hexdigest()[:16]


def main() -> int:
    record_path = sys.argv[1]
    assert sys.argv[2] == "--"
    argv = sys.argv[3:]
    from mtl_jax.data import pipeline

    record = open(record_path, "a")

    def write(entry):
        record.write(json.dumps(entry) + "\n")
        record.flush()

    original_next = pipeline.ShardedIterator.__next__

    def recorded_next(self):
        batch = original_next(self)
        write({"kind": "train", "images": [_digest(r) for r in _local_rows(batch["image"])]})
        return batch

    pipeline.ShardedIterator.__next__ = recorded_next
    original_eval = pipeline.eval_batches
    calls = [0]

    def recorded_eval(*args, **kwargs):
        calls[0] += 1
        call = calls[0]
        for batch in original_eval(*args, **kwargs):
            images = [_digest(r) for r in _local_rows(batch["image"])]
            mask = [float(m) for m in _local_rows(batch["example_mask"])]
            write({"kind": "eval", "call": call, "images": images, "mask": mask})
            yield batch
        write({"kind": "eval_done", "call": call})

    pipeline.eval_batches = recorded_eval
    from mtl_jax.main import main as mtl_main

    return mtl_main(argv)


if __name__ == "__main__":
    sys.exit(main())
