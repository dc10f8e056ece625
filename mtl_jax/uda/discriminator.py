"""Output-level patch discriminators for adversarial domain adaptation (DenseMTL's MTL-UDA).

:class:`PatchDiscriminator` is the fully-convolutional discriminator of ADVENT as DenseMTL
uses it (docs/models/densemtl.md, "MTL-UDA"): five 4×4 stride-2 convolutions (padding 1) with
64-128-256-512-1 output channels, LeakyReLU(0.2) after all but the last, every kernel
spectrally normalised with Flax's :class:`flax.linen.SpectralNorm` (one power iteration per
call). Its output is a map of patch logits ``[B, H/32, W/32, 1]`` ("source" = 1). For a
1-channel input it has 16·64+64 + 16·64·128+128 + 16·128·256+256 + 16·256·512+512 + 16·512+1
= 2,762,689 parameters.

Spectral-norm state: the power iteration's ``u`` vector and the last ``sigma`` of every kernel
live in the ``batch_stats`` collection (Flax's convention), under ``sn<i>/conv<i>/kernel/u``
and ``.../sigma``. ``update_stats=True`` (the discriminator's own update) stores the new
``u``/``sigma``; ``update_stats=False`` computes the same normalised kernel without storing.

Random horizontal flip of the input (DenseMTL's discriminators see flipped maps half of the
time): pass ``flip_rng``; every example is flipped with probability 1/2, independently.

:class:`TaskDiscriminators` holds one :class:`PatchDiscriminator` per key (``'<task>_s<k>'``,
task and output scale) and applies each to its own input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.layers import conv

DEFAULT_CHANNELS = (64, 128, 256, 512)


def random_hflip(x_BxHxWxC: jax.Array, rng: jax.Array) -> jax.Array:
    """Flip every example horizontally with probability 1/2 (independently per example)."""
    flip_B = jax.random.bernoulli(rng, 0.5, (x_BxHxWxC.shape[0],))
    return jnp.where(flip_B[:, None, None, None], x_BxHxWxC[:, :, ::-1, :], x_BxHxWxC)


class PatchDiscriminator(nn.Module):
    """Spectral-normalised fully-convolutional patch discriminator (module docstring).

    Attributes:
      channels: output channels of the hidden convolutions (the last conv has 1).
      negative_slope: LeakyReLU slope.
      power_iterations: power-iteration steps per call of every spectral norm.
    """

    channels: Sequence[int] = DEFAULT_CHANNELS
    negative_slope: float = 0.2
    power_iterations: int = 1

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, *, update_stats: bool,
                 flip_rng: jax.Array | None = None) -> jax.Array:
        """Input map ``[B, H, W, C]`` -> patch logits ``[B, H/32, W/32, 1]`` float32."""
        x = jnp.asarray(x_BxHxWxC, jnp.float32)
        if flip_rng is not None:
            x = random_hflip(x, flip_rng)
        features = (*self.channels, 1)
        for i, ch in enumerate(features):
            # Flax's nn.Conv defaults (bias, LeCun-normal kernel), torch's padding 1, and the
            # CPU kernel gradient of layers.conv; the parameter tree is nn.Conv's.
            layer = conv(ch, 4, strides=2, use_bias=True,
                         kernel_init=nn.initializers.lecun_normal(), name=f"conv{i}")
            x = nn.SpectralNorm(layer, n_steps=self.power_iterations, name=f"sn{i}")(
                x, update_stats=update_stats)
            if i < len(features) - 1:
                x = nn.leaky_relu(x, self.negative_slope)
        return x


class TaskDiscriminators(nn.Module):
    """One :class:`PatchDiscriminator` per key; parameters ``<key>/...``.

    Attributes:
      keys: discriminator names, e.g. ``('semseg_s0', 'semseg_s1', 'depth_s0', 'depth_s1')``.
      channels, negative_slope, power_iterations: of every discriminator.
    """

    keys: Sequence[str]
    channels: Sequence[int] = DEFAULT_CHANNELS
    negative_slope: float = 0.2
    power_iterations: int = 1

    def setup(self) -> None:
        self.discs = {k: PatchDiscriminator(self.channels, self.negative_slope,
                                            self.power_iterations, name=k) for k in self.keys}

    def __call__(self, inputs: Mapping[str, jax.Array], *, update_stats: bool,
                 flip_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """``{key: [B, H, W, C_key]}`` -> ``{key: patch logits [B, h, w, 1]}``."""
        missing = set(self.keys) - set(inputs)
        if missing:
            raise ValueError(f"TaskDiscriminators: no input for {sorted(missing)}")
        out = {}
        for i, k in enumerate(self.keys):
            rng = None if flip_rng is None else jax.random.fold_in(flip_rng, i)
            out[k] = self.discs[k](inputs[k], update_stats=update_stats, flip_rng=rng)
        return out
