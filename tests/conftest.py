"""Test session setup: 4 fake CPU devices, a persistent compilation cache, a tiny prepared
synthetic dataset.

The whole suite runs with ``--xla_force_host_platform_device_count=4`` so that sharded and
unsharded computations can be compared in one process (single-device tests build a mesh of
``jax.devices()[:1]``).

Many tests compile the same programs (the smoke models' init, train and eval steps) through
separate ``jax.jit`` objects, in this process, in pytest-xdist workers and in ``mtl-jax``
subprocesses; JAX's persistent compilation cache (keyed by the program, so it is never stale)
under ``.pytest_cache/`` lets them compile each program once per suite run. Set
``JAX_COMPILATION_CACHE_DIR`` yourself to move it, or to ``""`` to switch it off.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
# Compile-light XLA (backend optimisation level 0, no expensive LLVM passes), as Flax's own
# model tests do: the suite's time is mostly XLA compiling train steps it then runs a handful
# of times on tiny inputs. Set JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test the default pipeline.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
    "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The tiny dataset variant used across tests (fast to build, fast to train on).
TINY = dict(height=32, width=48, num_train=24, num_val=10, seed=0)

#: The UDA tests' model: the quickstart smoke model (ResNet-18 at width 4 + a small U-Net),
#: which compiles in a fraction of DenseMTL's time; the UDA code is model-agnostic, and the
#: DenseMTL smoke config itself is traced in test_uda.test_densemtl_smoke_config_step_shapes.
TINY_UDA_MODEL = dict(encoder="resnet18", encoder_kwargs=dict(width=4), encoder_init="",
                      decoder="unet", decoder_kwargs=dict(features=8, convs_per_block=1),
                      dtype="float32")
_UDA_CONFIG_FILE = """
import importlib.util

import ml_collections


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("_densemtl_uda", {path!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("smoke")
    c.model = ml_collections.ConfigDict({model!r})
    c.uda.scales = (0,)
    return c
"""


def write_uda_config(path) -> str:
    """A config file for ``mtl-jax train --config=PATH``: configs/densemtl_uda.py's smoke
    config with :data:`TINY_UDA_MODEL` and discriminators at the output only."""
    with open(path, "w") as f:
        f.write(_UDA_CONFIG_FILE.format(path=os.path.join(REPO, "configs", "densemtl_uda.py"),
                                        model=TINY_UDA_MODEL))
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data dir with the tiny synthetic dataset prepared (source domain)."""
    import tensorflow_datasets as tfds

    from mtl_jax.data import registry

    tfds.disable_progress_bar()
    d = tmp_path_factory.mktemp("tfds")
    registry.build("synthetic", data_dir=str(d), **TINY)
    return str(d)


@pytest.fixture(scope="session")
def uda_data_dir(data_dir):
    """The session's tiny dataset dir with the target domain built next to the source."""
    from mtl_jax.data import registry

    registry.build("synthetic", "target", data_dir, **TINY)
    return data_dir


@pytest.fixture(scope="session")
def sde_data_dir(uda_data_dir):
    """The session's tiny dataset dir with procedural frame triplets (config ``triplets``,
    what ``configs/densemtl_sde.py:smoke`` reads) built next to the two domains."""
    from mtl_jax.data import registry

    registry.build("synthetic", "triplets", uda_data_dir, **TINY)
    return uda_data_dir


def smoke_config(data_dir, **overrides):
    """``configs/quickstart.py:smoke`` on the session's tiny dataset, on one device, with
    ``overrides`` (top-level keys)."""
    from mtl_jax.config_utils import load_config

    c = load_config(os.path.join(REPO, "configs", "quickstart.py"), "smoke")
    assert c.dataset.options.to_dict() == {k: TINY[k] for k in c.dataset.options}
    c.dataset.data_dir = data_dir
    c.num_devices = 1
    for k, v in overrides.items():
        c[k] = v
    return c


class BadLabels:
    """A split whose example ``index`` has ``n`` semseg pixels of class 77."""

    def __init__(self, src, index, n):
        self.src, self.index, self.n = src, index, n

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        import numpy as np

        ex = dict(self.src[i])
        if i == self.index:
            semseg = np.array(ex["semseg"])
            semseg.reshape(-1)[:self.n] = 77
            ex["semseg"] = semseg
        return ex


def race_for_the_lock(workdir: str, runs: int = 6):
    """``runs`` threads take the workdir lock of ``workdir`` at once (released together by a
    barrier): ``(locks they got, messages of the refusals)``."""
    import threading

    from mtl_jax import workdir_lock
    from mtl_jax.errors import UserError

    got, refused = [], []
    barrier = threading.Barrier(runs)

    def take():
        lock = workdir_lock.WorkdirLock(workdir, enabled=True)
        barrier.wait()
        try:
            lock.acquire()
            got.append(lock)
        except UserError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got, refused
