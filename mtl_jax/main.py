"""The ``mtl-jax`` command line: parses arguments and calls one library function each.

Subcommands::

    mtl-jax data build NAME [--manual_dir M] [--data_dir D] [--config C] [options]
    mtl-jax data show NAME --out grid.png [--split val]       picture grid of examples
    mtl-jax train --config=configs/quickstart.py[:args] --workdir=W [--config.a.b=v]
    mtl-jax eval  --config=... --workdir=W [--step N]
    mtl-jax params --config=...                               parameter count per part
    mtl-jax convert-weights SRC.pth DST.npz                   torchvision ResNet -> .npz
    mtl-jax convert-weights --from=NAME SRC.npz DST.npz [--config=C] [--option k=v]
                                                 authors' PyTorch model -> config.model.init_from
    mtl-jax predict --workdir=W --images=DIR_OR_GLOB --out=DIR  PNGs + .npy per task
    mtl-jax compare W1 W2 ... [--baseline S1,S2 ...]          Markdown table + curves PNG

Errors are one line ``mtl-jax: error: ...`` (add ``--verbose`` anywhere, or set
``MTL_JAX_VERBOSE=1``, to see the traceback). Exit codes: 0 done, 1 error, 2 bad command
line, 75 preempted by SIGTERM after saving (run the same command again to resume), 130
interrupted by Ctrl-C; see docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import sys

_TRAINING_COMMANDS = ("train", "eval", "params")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line ``mtl-jax: error: ...``, exit 2."""

    def error(self, message: str):
        from mtl_jax.errors import UsageError

        raise UsageError(f"{self.prog}: {message} (see: {self.prog} --help)")


def _add_dataset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="dataset name, e.g. 'synthetic'")
    p.add_argument("--data_dir", default=None,
                   help="where prepared datasets live (default: $TFDS_DATA_DIR or the TFDS "
                        "default, ~/tensorflow_datasets)")
    p.add_argument("--config", default=None,
                   help="builder config name (synthetic: the domain, 'source' or 'target', "
                        "or 'triplets' for frame triplets with camera poses; "
                        "real datasets: e.g. the resolution, see docs/datasets.md)")
    g = p.add_argument_group("synthetic dataset options")
    # synthetic.CONFIG_DOMAINS (not imported here: TFDS is slow to import)
    g.add_argument("--domain", default=None, choices=("source", "target", "triplets"))
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num_train", type=int, default=None)
    g.add_argument("--num_val", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)


def _builder_options(args: argparse.Namespace) -> dict:
    keys = ("domain", "height", "width", "num_train", "num_val", "seed")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _data_build(args: argparse.Namespace) -> int:
    from mtl_jax.data import registry

    builder = registry.build(args.name, args.config, args.data_dir, manual_dir=args.manual_dir,
                             **_builder_options(args))
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f"prepared {args.name} ({registry.config_name(builder)}) in {builder.data_dir}: "
          f"{splits}")
    return 0


def _data_show(args: argparse.Namespace) -> int:
    from mtl_jax.data import augment, registry, visualize
    from mtl_jax.errors import UserError
    from mtl_jax.evaluation import pictures

    src = registry.open_split(args.name, args.split, args.config, args.data_dir,
                              **_builder_options(args))
    n = min(args.num, len(src))
    try:
        examples = [augment.decode(src[i], normals_from_depth=args.normals_from_depth)
                    for i in range(n)]
    except ValueError as e:
        raise UserError(str(e)) from e
    visualize.save_png(args.out, pictures.example_grid(examples))
    print(f"wrote {args.out}: {n} examples of {args.name}/{args.split}")
    return 0


def _data_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mtl-jax data",
                                     description="Prepare and look at datasets.")
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="prepare a dataset as array_record (no download)")
    _add_dataset_options(b)
    b.add_argument("--manual_dir", default=None,
                   help="real datasets: the folder you downloaded (its expected tree is in "
                        "docs/datasets.md and in the error message when something is missing)")
    b.set_defaults(func=_data_build)
    s = sub.add_parser("show", help="write a PNG grid of examples and all their labels")
    _add_dataset_options(s)
    s.add_argument("--out", default="grid.png", help="output PNG path")
    s.add_argument("--split", default="train")
    s.add_argument("--num", type=int, default=6, help="number of examples (rows)")
    s.add_argument("--normals_from_depth", action="store_true",
                   help="show normals computed from depth and intrinsics (as the training "
                        "pipeline does with config.dataset.normals_from_depth)")
    s.set_defaults(func=_data_show)
    return parser


def _convert_weights(rest: list[str]) -> int:
    parser = _Parser(
        prog="mtl-jax convert-weights",
        description="Without --from: convert a local torchvision ResNet state_dict (.pth) to "
                    "the .npz that config.model.encoder_init reads (needs torch). With "
                    "--from=NAME: map a state_dict of an authors' PyTorch model, saved as an "
                    ".npz of name -> array, onto our parameters (docs/models/*.md name the "
                    "models); the result is read by config.model.init_from. Downloads nothing.")
    parser.add_argument("src", help="torchvision .pth file, or with --from a state_dict .npz")
    parser.add_argument("dst", help="output .npz path")
    parser.add_argument("--from", dest="source", default=None,
                        help="reference code the state_dict comes from (mtl_jax.models."
                             "converters.CONVERTERS)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="converter option, repeatable (see the converter's docs)")
    parser.add_argument("--config", default=None,
                        help="configs/x.py[:args] of the model the weights are for: its task "
                             "order (config.task_order) fixes the layout of the converters "
                             "that depend on it (densemtl's fusion convs)")
    args = parser.parse_args(rest)
    if args.source is None:
        if args.config:
            from mtl_jax.errors import UsageError

            raise UsageError("--config goes with --from=NAME (a torchvision ResNet has no "
                             "tasks)")
        from mtl_jax.models import pretrained

        n = pretrained.convert_torch_checkpoint(args.src, args.dst)
        print(f"wrote {args.dst}: {n} arrays")
        return 0
    from mtl_jax.errors import UsageError
    from mtl_jax.models import converters

    options = {}
    for item in args.option:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--option needs KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    task_order = None
    if args.config:
        from mtl_jax import config_utils, experiment

        task_order = experiment.task_order(config_utils.load_config(args.config))
    n = converters.convert_file(args.source, args.src, args.dst, task_order=task_order,
                                **options)
    print(f"wrote {args.dst}: {n} arrays (load with --config.model.init_from={args.dst})")
    return 0


def _predict(rest: list[str]) -> int:
    parser = _Parser(
        prog="mtl-jax predict",
        description="Run a trained checkpoint on image files. Each image is resized to the "
                    "config's input_size; per image and task it writes <stem>_<task>.png "
                    "(colour-coded) and .npy (semseg class ids, metric depth, unit normals, "
                    "edge probabilities, attention maps) into --out.")
    parser.add_argument("--workdir", required=True, help="the run's --workdir")
    parser.add_argument("--images", required=True,
                        help="a folder of images, a glob ('photos/*.jpg') or one file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step (default: latest)")
    parser.add_argument("--config", default=None,
                        help="configs/x.py[:args] (default: the run's own config.json)")
    args = parser.parse_args(rest)
    from mtl_jax import config_utils, predict

    config = config_utils.load_config(args.config) if args.config else None
    written = predict.predict(args.workdir, args.images, args.out, step=args.step,
                              config=config)
    n_images = sum(p.endswith("_input.png") for p in written)
    print(f"wrote {len(written)} files for {n_images} images into {args.out}")
    return 0


def _compare(rest: list[str]) -> int:
    parser = _Parser(
        prog="mtl-jax compare",
        description="Markdown table of the final metrics (results.json) of several runs, "
                    "with Δm against single-task runs when --baseline is given, and, with "
                    "--plot=FILE, a PNG of their eval curves.")
    parser.add_argument("workdirs", nargs="+", help="run directories (--workdir of train)")
    parser.add_argument("--baseline", default="",
                        help="comma-separated single-task run dirs (or results.json files)")
    parser.add_argument("--plot", default="",
                        help="write a PNG of the eval curves to this file (default: none)")
    parser.add_argument("--side", action="store_true",
                        help="also list side-output metrics (<task>/side/<k>/...)")
    args = parser.parse_args(rest)
    from mtl_jax import compare

    baselines = [b.strip() for b in args.baseline.split(",") if b.strip()]
    print(compare.compare(args.workdirs, baselines, include_side=args.side), end="")
    if args.plot:
        compare.plot_curves(args.workdirs, args.plot, include_side=args.side)
        print(f"\nwrote {args.plot}")
    return 0


def _top_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mtl-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command",
                                metavar="{data,train,eval,params,predict,compare,convert-weights}")
    sub.add_parser("data", help="prepare (build) and look at (show) datasets", add_help=False)
    sub.add_parser("train", help="train and evaluate a model from a config", add_help=False)
    sub.add_parser("eval", help="evaluate a checkpoint from a workdir", add_help=False)
    sub.add_parser("params", help="print parameter counts of a config's model", add_help=False)
    sub.add_parser("predict", help="run a checkpoint on image files (PNGs + .npy)",
                   add_help=False)
    sub.add_parser("compare", help="table of several runs' metrics (+ Δm) and their curves",
                   add_help=False)
    sub.add_parser("convert-weights", add_help=False,
                   help="torchvision ResNet .pth -> .npz (config.model.encoder_init), or "
                        "--from=NAME: an authors' model -> config.model.init_from")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mtl-jax`` console script; returns the exit code."""
    from mtl_jax import errors, log_routing

    own_process = argv is None  # the console script: this process ends with the command
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:  # for every error path, also the multi-process exit
        os.environ["MTL_JAX_VERBOSE"] = "1"
    argv = [a for a in argv if a != "--verbose"]
    # Background threads' tracebacks (a failed save's) go to a file, the error is one line.
    with log_routing.background_tracebacks_to_file(keep=own_process):
        try:
            return _dispatch(argv)
        except (errors.Preempted, errors.UserError, KeyboardInterrupt) as e:
            return errors.report(e)


def _dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "data":
        args = _data_parser().parse_args(rest)
        return args.func(args)
    if command in _TRAINING_COMMANDS:
        from mtl_jax import cli_training

        return cli_training.run(command, rest)
    if command == "convert-weights":
        return _convert_weights(rest)
    if command == "predict":
        return _predict(rest)
    if command == "compare":
        return _compare(rest)
    _top_parser().print_help()
    print(f"\nmtl-jax: unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
