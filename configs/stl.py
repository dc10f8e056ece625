r"""Single-task baselines (STL) on the procedural dataset: one model per task.

Each run trains the quickstart architecture with one decoder, for one task, and writes
``results.json`` into its workdir; MTL configs name those files in
``config.baseline_results`` to report the relative multi-task gain Δm::

    for t in s d n; do
      mtl-jax train --config=configs/stl.py:task=$t --workdir=workdir/stl_$t
    done
    mtl-jax train --config=configs/quickstart.py --workdir=workdir/quickstart_dm \
      --config.baseline_results=workdir/stl_s/results.json,workdir/stl_d/results.json,\
    workdir/stl_n/results.json

Arguments: ``task=s|d|n|e|r`` (one letter), ``smoke``, ``steps=N``.
Hardware and time: 2 CPU cores, a little less than the quickstart per task (one decoder).
"""

import ml_collections

from mtl_jax.config_utils import load_config, parse_arg, task_set


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, task="s", smoke=False, steps=1200)
    if len(args.task) != 1:
        from mtl_jax.errors import UserError

        raise UserError(f"stl takes exactly one task letter, got task={args.task!r}")
    sub = f"tasks={args.task},steps={args.steps}" + (",smoke" if args.smoke else "")
    c = load_config("quickstart.py", sub, relative_to=__file__)
    assert tuple(c.tasks) == task_set(args.task)
    return c
