"""Units of the multi-process support that need no second process: URL workdirs, the
coordinator flags, and workdir files written through etils.epath (mocked Cloud Storage). The
two-process runs are in ``tests/test_multiprocess.py``."""

import json
import os

import numpy as np
import pytest

from mtl_jax import checkpointing


def test_url_workdir_keeps_its_scheme():
    assert checkpointing.checkpoint_dir("gs://bucket/runs/a/") == "gs://bucket/runs/a/checkpoints"
    assert checkpointing.checkpoint_dir("rel") == os.path.join(os.getcwd(), "rel", "checkpoints")


def test_partial_coordinator_flags_are_a_user_error():
    from mtl_jax import distributed
    from mtl_jax.errors import UserError

    with pytest.raises(UserError, match="need all of"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(UserError, match=r"--process_id=2 must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)


def test_gs_workdir_files_go_through_epath(tmp_path):
    """metrics.jsonl, hparams and pictures of a gs:// workdir are written with etils.epath
    (Cloud Storage mocked by a local folder: objects are rewritten, never appended to)."""
    from etils.epath import testing as epath_testing

    from mtl_jax import writers
    from mtl_jax.data import visualize

    def local(path):
        return str(path).replace("gs://", str(tmp_path / "gcs") + "/")

    def redirect(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    with epath_testing.mock_epath(open=redirect, exists=redirect, mkdir=redirect,
                                  makedirs=redirect, isdir=redirect):
        os.makedirs(local("gs://bucket/run"), exist_ok=True)
        w = writers.JsonlWriter("gs://bucket/run/metrics.jsonl")
        w.write_scalars(1, {"a": 1.0})
        w.write_hparams({"lr": 0.1})
        w.close()
        w = writers.JsonlWriter("gs://bucket/run/metrics.jsonl")  # a resumed run
        w.write_scalars(2, {"a": 2.0})
        w.close()
        visualize.save_png("gs://bucket/run/p.png", np.zeros((4, 6, 3), np.uint8))
    run = tmp_path / "gcs" / "bucket" / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    assert json.loads((run / "hparams.json").read_text()) == {"lr": 0.1}
    from PIL import Image

    assert Image.open(run / "p.png").size == (6, 4)
