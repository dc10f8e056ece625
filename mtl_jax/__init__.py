"""mtl_jax: dense multi-task learning for scene understanding in JAX/Flax.

Layers (imports point downward only; tests/test_import_graph.py checks that the package has no
import circle): ``main`` (CLI) -> ``cli_training`` -> ``train`` (the one training loop) ->
``uda`` (domain adaptation, a kind of run) -> ``run_support`` (the run interface, the loop's
checks) -> ``experiment`` (config -> compiled steps) -> ``steps`` -> ``weighting`` /
``models`` / ``tasks`` / ``data`` / ``evaluation``; ``checkpointing``, ``writers``,
``run_config``, ``workdir_lock`` and ``errors`` serve the loop from below. Nothing in this
package imports ``configs/``, ``colab/`` or ``benchmarks/``.
"""

__version__ = "0.1.0"
