"""TFDS builder of the procedural multi-task scene dataset (``synthetic``).

The builder renders examples with :mod:`mtl_jax.data.synthetic_render` (in worker processes)
and writes them as ``array_record`` so that they are read by the same grain pipeline as the
real datasets. Record ``i`` of a split is example ``i`` (shuffling is done at read time).

Builder configs are named after the domain (``source``, ``target``, or ``triplets``: frame
triplets t-1, t, t+1 with camera poses, :mod:`mtl_jax.data.synthetic_triplets`) for the default
resolution and split sizes; any other combination gets a name that spells its settings, e.g.
``source_32x48_n16-8_s0``, so that several variants live side by side in one data dir.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds

from mtl_jax.data import synthetic_render as render
from mtl_jax.data import synthetic_triplets as triplets
from mtl_jax.errors import UserError

DEFAULT_HEIGHT, DEFAULT_WIDTH = 96, 128
DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL = 2000, 500
#: The "domains" a builder config may name: the two visual domains and the triplet variant.
CONFIG_DOMAINS = (*render.DOMAINS, triplets.TRIPLETS)


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """Resolution, split sizes, seed and visual domain (or ``triplets``) of one variant."""

    domain: str = "source"
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    num_train: int = DEFAULT_NUM_TRAIN
    num_val: int = DEFAULT_NUM_VAL
    seed: int = 0


def config_name(domain: str = "source", height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL,
                seed: int = 0) -> str:
    """The builder-config name of a variant (the plain domain name for the defaults)."""
    if (height, width, num_train, num_val, seed) == (
            DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, 0):
        return domain
    return f"{domain}_{height}x{width}_n{num_train}-{num_val}_s{seed}"


def make_config(domain: str = "source", height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL,
                seed: int = 0) -> SyntheticConfig:
    """A validated :class:`SyntheticConfig` with its canonical name."""
    if domain not in CONFIG_DOMAINS:
        raise UserError(f"synthetic: domain must be one of {CONFIG_DOMAINS}, got {domain!r}")
    if height < 8 or width < 8:
        raise UserError(f"synthetic: resolution must be at least 8x8, got {height}x{width}")
    if num_train < 1 or num_val < 1:
        raise UserError(f"synthetic: split sizes must be >= 1, got {num_train}/{num_val}")
    name = config_name(domain, height, width, num_train, num_val, seed)
    return SyntheticConfig(
        name=name, domain=domain, height=height, width=width, num_train=num_train,
        num_val=num_val, seed=seed,
        description=f"{domain} {'frames' if domain == triplets.TRIPLETS else 'domain'}, "
                    f"{height}x{width}, {num_train} train / {num_val} val, seed {seed}")


def _render_chunk(args: tuple) -> list[dict[str, np.ndarray]]:
    seed, split, indices, height, width, domain = args
    if domain == triplets.TRIPLETS:
        return [_to_record(triplets.render_triplet(seed, split, i, height, width), i)
                for i in indices]
    return [_to_record(render.render_example(seed, split, i, height, width, domain), i)
            for i in indices]


def _to_record(ex: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """Storage dtypes: normals as float16 (renormalised when read), labels as int8."""
    out = dict(ex)
    out["normals"] = ex["normals"].astype(np.float16)
    out["index"] = np.int32(index)
    return out


class MtlSynthetic(tfds.core.GeneratorBasedBuilder):
    """Procedural indoor scenes with exact semseg, depth, normals and edges (two domains),
    and frame triplets with camera poses (config ``triplets``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [make_config("source"), make_config("target"), make_config("triplets")]
    DEFAULT_CONFIG_NAME = "source"
    #: Generated here, never downloaded: the trainer may build it on demand.
    GENERATED = True
    NUM_CLASSES = render.NUM_CLASSES
    CLASS_NAMES = render.CLASSES

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        h, w = c.height, c.width
        zlib = tfds.features.Encoding.ZLIB
        frames = {}
        if c.domain == triplets.TRIPLETS:
            frames = {
                "image_prev": tfds.features.Tensor(shape=(h, w, 3), dtype=np.uint8),
                "image_next": tfds.features.Tensor(shape=(h, w, 3), dtype=np.uint8),
                "pose_prev": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
                "pose_next": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
            }
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                **frames,
                "image": tfds.features.Tensor(shape=(h, w, 3), dtype=np.uint8),
                "semseg": tfds.features.Tensor(shape=(h, w), dtype=np.int8, encoding=zlib),
                "depth": tfds.features.Tensor(shape=(h, w, 1), dtype=np.float32),
                "normals": tfds.features.Tensor(shape=(h, w, 3), dtype=np.float16),
                "edges": tfds.features.Tensor(shape=(h, w), dtype=np.int8, encoding=zlib),
                "intrinsics": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "light": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
            disable_shuffling=True,
            homepage="https://github.com/mtl-jax/mtl_jax",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train),
                "val": self._generate_examples("val", c.num_val)}

    def _generate_examples(self, split: str, num: int):
        c = self.builder_config
        workers = max(1, min(os.cpu_count() or 1, 8, num // 32 or 1))
        chunk = 32
        jobs = [(c.seed, split, range(s, min(s + chunk, num)), c.height, c.width, c.domain)
                for s in range(0, num, chunk)]
        if workers == 1:
            results = map(_render_chunk, jobs)
            for i, ex in enumerate(ex for part in results for ex in part):
                yield i, ex
            return
        # fork: workers run NumPy only and need no re-import of the caller's main module
        # (which "spawn" requires, and which breaks scripts without a __main__ guard).
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for i, ex in enumerate(ex for part in pool.map(_render_chunk, jobs) for ex in part):
                yield i, ex
