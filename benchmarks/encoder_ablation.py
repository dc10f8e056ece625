"""ResNet encoder forward + backward with and without single CPU speed changes, in one process.

Usage::

    python benchmarks/encoder_ablation.py [--depth 101] [--size 224x288] [--batch 2]
        [--rounds 10] [--without bn,s2d]

Compiles the encoder's step (``benchmarks/torch_reference.py``'s ``jax_encoder_loss``: the
five features' mean squares, train-mode BatchNorm, gradients of the parameters) twice: as the
library builds it, and with the changes named by ``--without`` undone while tracing:

* ``bn``: BatchNorm's closed-form training backward (``cpu_grads.batch_norm_train``) replaced by
  JAX's derivative of the same forward formula (``cpu_grads.disabled('batch_norm')``);
* ``s2d``: the space-to-depth kernel gradient of strided stem convolutions
  (``cpu_grads.conv.space_to_depth_pays_off`` answering no, so plain taps are used).

Then it alternates the two executables (``--rounds`` rounds of 3 steps, the order flipped every
round) and prints the medians and their ratio. Both run in the same process, back to back, so
the machine's drifting speed (±10-20 % within minutes on the 2-core machine) cancels, which two
separate runs cannot resolve for a few-per-cent change. The losses of the two are printed too
(equal to float rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import jax

from mtl_jax.models import cpu_grads
from mtl_jax.models.cpu_grads import conv as cpu_conv

sys.path.insert(0, os.path.dirname(__file__))
from torch_reference import jax_encoder_loss  # noqa: E402

ABLATIONS = ("bn", "s2d")


@contextlib.contextmanager
def undone(names: list[str]):
    """Undo the named changes for what is traced inside (the ``batch_norm`` kernel switched
    off; ``space_to_depth_pays_off`` replaced, restored after)."""
    saved = {}
    if "s2d" in names:
        saved["space_to_depth_pays_off"] = cpu_conv.space_to_depth_pays_off
        cpu_conv.space_to_depth_pays_off = lambda *args: False
    try:
        with cpu_grads.disabled("batch_norm") if "bn" in names else contextlib.nullcontext():
            yield
    finally:
        for name, value in saved.items():
            setattr(cpu_conv, name, value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=101)
    p.add_argument("--size", default="224x288")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--without", default="bn,s2d", help=f"comma-separated, of {ABLATIONS}")
    args = p.parse_args()
    names = [n for n in args.without.split(",") if n]
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        raise SystemExit(f"--without: unknown {unknown}; choose from {ABLATIONS}")
    h, w = (int(v) for v in args.size.split("x"))
    loss, params, image = jax_encoder_loss(args.depth, h, w, args.batch,
                                           (False, False, args.depth >= 50))

    steps = {}
    with undone(names):
        steps["without"] = jax.jit(jax.value_and_grad(loss)).lower(params, image).compile()
    steps["with"] = jax.jit(jax.value_and_grad(loss)).lower(params, image).compile()
    losses = {}
    for key, step in steps.items():
        for _ in range(2):
            losses[key] = float(jax.block_until_ready(step(params, image))[0])
    times: dict[str, list[float]] = {key: [] for key in steps}
    for r in range(args.rounds):
        for key in (("without", "with") if r % 2 == 0 else ("with", "without")):
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(steps[key](params, image))
                times[key].append(time.perf_counter() - t0)
    off, on = (statistics.median(times[k]) for k in ("without", "with"))
    print(f"ResNet-{args.depth} {args.size} batch {args.batch}, without {names}: "
          f"{off * 1e3:.1f} ms, with: {on * 1e3:.1f} ms, with / without {on / off:.3f} "
          f"(losses {losses['without']:.6f} / {losses['with']:.6f})")


if __name__ == "__main__":
    main()
