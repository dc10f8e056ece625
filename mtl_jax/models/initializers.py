"""Kernel initialisers of the reference code bases, each defined once, by name.

PyTorch counts the receptive field in both fans of a conv kernel (HWIO here), as Flax's
``variance_scaling`` does, so these match the PyTorch functions named in each comment.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

Initializer = Callable[..., jax.Array]

#: torchvision ResNet: ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``, untruncated.
kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
#: PyTorch's default ``Conv2d`` kernel init: ``kaiming_uniform_(a=sqrt(5))`` = U(±1/√fan_in).
torch_default_kernel_init: Initializer = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform")
#: PyTorch's ``xavier_normal_`` (gain 1): N(0, 2 / (fan_in + fan_out)) -- MTAN's SegNet, the
#: TTNets and U-Net decoders of XTasC-Net.
xavier_normal: Initializer = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
#: PyTorch's ``xavier_uniform_`` (gain 1) -- MTAN's Dense and Cross-stitch baselines.
xavier_uniform: Initializer = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

#: config name -> initialiser (``config.model.init`` of the architectures that read one).
INITIALIZERS: dict[str, Initializer] = {
    "kaiming_normal_fan_out": kaiming_normal_fan_out,
    "torch_default": torch_default_kernel_init,
    "xavier_normal": xavier_normal,
    "xavier_uniform": xavier_uniform,
}
