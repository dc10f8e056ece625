"""mtl_jax: dense multi-task learning for scene understanding in JAX/Flax.

Layers (imports point downward only): ``main`` (CLI) -> ``train`` -> ``steps`` ->
``weighting`` / ``models`` / ``tasks`` / ``data`` / ``evaluation``. Nothing in this package
imports ``configs/``, ``colab/`` or ``benchmarks/``.
"""

__version__ = "0.1.0"
