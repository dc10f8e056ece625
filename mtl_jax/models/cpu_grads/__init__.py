"""CPU gradient kernels: where XLA's CPU backend is slow, a faster form of the same math.

Models never call this package: they use ``mtl_jax.models.layers`` (``conv``, ``max_pool``,
``add_relu``, ``BatchNorm``), which route through it. Every kernel gives the values of the op
it replaces (bit for bit, or to float rounding where a sum is taken in another order).

Every op replaced. *kernel*: its name for the switches below; *backend*: "CPU" means picked
per backend when lowering (``jax.lax.platform_dependent`` in the backward pass), so GPU and
TPU programs run XLA's own gradient; "all" means the rewrite runs on every backend (same
values, another program); *off*: what runs when the kernel is switched off; *test*: below.

=================================  ==========  =======  ==========================  =========  ====
op replaced (function)             kernel      backend  chosen when                 off        test
=================================  ==========  =======  ==========================  =========  ====
convolution's kernel gradient,     conv        CPU      ``layers.conv`` (2-D NHWC,  XLA's      [1]
one product per kernel tap                              padding ≥ 0 or VALID, no    gradients
(:func:`kernel_grad_by_taps`)                           groups or input dilation)
                                                        and :func:`taps_pay_off`
... in row chunks in a loop        conv        CPU      maps of more than           XLA's      [2]
(:func:`taps_chunk_rows`)                               ``TAPS_CHUNK_MIN_           gradients
                                                        POSITIONS`` positions
... by space-to-depth              conv        CPU      strided stem kernels        XLA's      [3]
(:func:`kernel_grad_space_to_                           (:func:`space_to_depth_     gradients
depth`)                                                 pays_off`)
1×1 convolution's input gradient   conv        CPU      stride-1 unpadded 1×1       XLA's      [4]
as one ``g · kᵀ``                                       kernels (in the taps' VJP)  gradients
max-pool's input gradient          max_pool    CPU      every ``layers.max_pool``   select-    [5]
(select-and-scatter): first                                                         and-
maximum by element-wise passes                                                      scatter
(:func:`max_pool_grad_by_mask`)
``relu(a + b)`` of a residual      add_relu    all      every ``layers.add_relu``   ``relu(a   [6]
block as ``max(a, -b) + b``,                            (ResNet blocks)             + b)``
VJP masked by the output (bit
for bit) (:func:`add_relu`)
BatchNorm's training backward in   batch_norm  all      every ``layers.BatchNorm``  JAX's      [7]
closed form (float rounding)                            with ``train=True``         derivative
(:func:`batch_norm_train`)
=================================  ==========  =======  ==========================  =========  ====

Tests: [1] tests/test_conv_grad.py ``test_taps_kernel_gradient_matches_xla``,
``test_which_kernels_take_the_taps``, ``test_only_the_cpu_backend_takes_the_taps`` (CUDA and
TPU lowerings keep XLA's); [2] ``test_row_chunks_give_the_same_kernel_gradient``,
``test_large_maps_are_chunked_and_take_the_taps_from_32_outputs``; [3]
``test_strided_stem_kernels_take_space_to_depth``; [4] the 1×1 cases of
``test_taps_kernel_gradient_matches_xla``; [5] tests/test_cpu_grad_paths.py
``test_max_pool_*``, ``test_stem_gradient_inside_a_model_equals_select_and_scatter_float64``,
``test_only_the_cpu_backend_takes_the_mask_gradient``; [6]
``test_add_relu_is_relu_of_the_sum_bit_for_bit_with_relus_gradient``,
``test_add_relu_keeps_cpu_fusions_from_re_deriving_the_residual_stream``; [7]
tests/test_fidelity_layers.py ``test_batchnorm_closed_form_gradient_matches_autodiff``.

Switching off (read when a model is traced; :mod:`.switch`): ``MTL_JAX_CPU_KERNELS=off``
turns every kernel off, ``MTL_JAX_CPU_KERNELS=max_pool,add_relu`` the ones named (``on`` is
the default); ``MTL_JAX_CPU_CONV_GRAD=xla`` turns ``conv`` off (the older switch);
``with cpu_grads.disabled(...)`` (all kernels without a name) does it inside one process, and
``xla_conv_gradients()`` is ``disabled('conv')``. ``tests/test_cpu_grad_paths.py``
(``test_one_switch_turns_every_kernel_off_...``) checks that the switch changes the lowered
program and not the results.

Not covered (XLA's gradients everywhere): ``nn.ConvTranspose`` (the attention U-Net's 2×2
up-convolutions), average pooling, the resizes. A guard test
(``test_models_use_the_layers_the_cpu_kernels_cover``) fails when a model module builds a raw
``nn.Conv``, ``nn.max_pool`` or ``jax.lax`` convolution / window reduction instead of the
layers. Measured speed-ups: docs/benchmarks.md, "Train-step speed on CPU".
"""

from mtl_jax.models.cpu_grads.closed_forms import add_relu, batch_norm_forward, batch_norm_train
from mtl_jax.models.cpu_grads.conv import (
    TAPS_CHUNK_MIN_POSITIONS,
    TAPS_CHUNK_POSITIONS,
    conv_general_dilated,
    kernel_grad_by_taps,
    kernel_grad_space_to_depth,
    space_to_depth_pays_off,
    taps_chunk_rows,
    taps_pay_off,
)
from mtl_jax.models.cpu_grads.pool import max_pool, max_pool_grad_by_mask, max_pool_nhwc
from mtl_jax.models.cpu_grads.switch import (
    CONV_GRAD_ENV,
    CPU_KERNELS_ENV,
    KERNELS,
    SwitchError,
    disabled,
    enabled,
    switched_off,
    xla_conv_gradients,
)

__all__ = [
    "CONV_GRAD_ENV",
    "CPU_KERNELS_ENV",
    "KERNELS",
    "TAPS_CHUNK_MIN_POSITIONS",
    "TAPS_CHUNK_POSITIONS",
    "SwitchError",
    "add_relu",
    "batch_norm_forward",
    "batch_norm_train",
    "conv_general_dilated",
    "disabled",
    "enabled",
    "kernel_grad_by_taps",
    "kernel_grad_space_to_depth",
    "max_pool",
    "max_pool_grad_by_mask",
    "max_pool_nhwc",
    "space_to_depth_pays_off",
    "switched_off",
    "taps_chunk_rows",
    "taps_pay_off",
    "xla_conv_gradients",
]
