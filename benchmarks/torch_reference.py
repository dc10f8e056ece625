"""Our ResNet encoder against torchvision's, forward + backward, same input, batch and threads.

Usage (``torch`` and ``torchvision`` are optional; never needed by the library or tests)::

    pip install torch torchvision          # any environment; may be a separate venv
    python benchmarks/torch_reference.py [--depths 18,34,50,101] [--size 224x288] [--batch 2]
        [--dilate 0,0,1] [--threads 2] [--steps 10] [--rounds 3] [--torch_python PATH]

Each measurement runs in its own process (``--side jax|torch`` re-invokes this file), the two
sides alternating ``--rounds`` times, so neither shares the cores with the other and a slow
phase of the machine hits both. One measurement: build the encoder (``train`` mode: BatchNorm
on batch statistics), run ``3`` warm-up steps, then the median of ``--steps`` steps of

    loss = sum_i mean(feature_i ** 2)  over the five features (stem, layer1..layer4)
    gradient of loss with respect to every parameter

(torch: ``loss.backward()`` after ``zero_grad``; ours: one jitted ``jax.value_and_grad``).
The torch side uses ``torch.set_num_threads(--threads)``; ours XLA's CPU client, whose
thread pool is the process's cores, so pin both with ``taskset`` for fewer threads than
cores. ``--torch_python`` runs the torch side with another interpreter (a venv that has torch).

Prints a Markdown table for ``docs/benchmarks.md`` ("Against PyTorch"): per depth, the median
over rounds of each side's median step, their ratio, and the ratio within each round (the
machine's speed drifts between rounds; a round's two sides run back to back).

``--gradients`` compares instead of timing: the gradients of that loss, both sides in
**float64** (torch: the model and input in double; ours: the same torchvision weights imported
with ``mtl_jax.models.pretrained.resnet_from_torchvision``, ``dtype=param_dtype=float64``
under ``jax.enable_x64``; our BatchNorm still normalises in float32, which bounds the
agreement near 1e-6), from the same input, ``train`` mode. It prints, per depth, the loss of
both sides and the relative error ``||g_ours - g_torch|| / ||g_torch||`` of the stem's
tensors, ``layer1``'s, and the worst tensor of the whole encoder. Float64 removes the
conditioning noise that float32 shows on these deep networks (a few per cent per tensor),
so anything above ~1e-5 is a real difference.

``--convs N:H:W:CIN:K:COUT,...`` times single convolutions instead (stride 1, "same" padding,
no bias; NCHW on the torch side, NHWC on ours): the forward pass and forward + backward
(gradients of input and kernel of ``sum(y ** 2)``), ours both with the library's convolution
(``mtl_jax.models.cpu_grads.conv_general_dilated``: kernel gradient by taps where it pays off)
and with XLA's own gradients. This separates what the convolution kernels cost from what
the model around them adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _features_loss_torch(features):
    return sum((f * f).mean() for f in features)


def _median_time(fn, steps: int) -> float:
    """Median seconds of ``steps`` calls of ``fn`` after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_side(depth: int, h: int, w: int, batch: int, dilate, threads: int,
               steps: int) -> dict:
    import torch
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = getattr(torchvision.models, f"resnet{depth}")(
        weights=None, replace_stride_with_dilation=list(dilate) if depth >= 50 else None)
    net.train()
    image = torch.randn(batch, 3, h, w)

    def forward(x):
        x = net.relu(net.bn1(net.conv1(x)))
        feats = [x]
        x = net.maxpool(x)
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def step():
        net.zero_grad(set_to_none=True)
        loss = _features_loss_torch(forward(image))
        loss.backward()
        return float(loss)

    seconds = _median_time(step, steps)
    params = sum(p.numel() for p in net.parameters() if p is not net.fc.weight
                 and p is not net.fc.bias)
    return {"s": seconds, "params": params,
            "version": f"torch {torch.__version__}"}


def torch_gradients(depth: int, h: int, w: int, batch: int, dilate, out: str) -> dict:
    """Torch side of ``--gradients``: torchvision's ResNet in float64, one forward/backward;
    writes the state_dict, the input and the gradients to ``out`` (.npz)."""
    import numpy as np
    import torch
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, f"resnet{depth}")(
        weights=None, replace_stride_with_dilation=list(dilate) if depth >= 50 else None)
    net = net.double().train()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    state = {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}
    image = np.random.default_rng(0).normal(size=(batch, 3, h, w))
    x = torch.from_numpy(image)
    feats = []
    y = net.relu(net.bn1(net.conv1(x)))
    feats.append(y)
    y = net.maxpool(y)
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        y = layer(y)
        feats.append(y)
    loss = _features_loss_torch(feats)
    loss.backward()
    arrays = {f"state/{k}": v for k, v in state.items()}
    arrays.update({f"grad/{k}": p.grad.detach().numpy() for k, p in net.named_parameters()
                   if p.grad is not None})  # fc is not used
    arrays["image"] = image
    arrays["loss"] = np.asarray(loss.item())
    np.savez(out, **arrays)
    return {"loss": loss.item(), "version": f"torch {torch.__version__}"}


def jax_gradient_errors(depth: int, dilate, npz: str) -> dict:
    """Our side of ``--gradients``: the same weights and input in float64; returns the
    relative gradient error per torchvision parameter name."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from mtl_jax.models.encoders import build_encoder
    from mtl_jax.models.pretrained import resnet_from_torchvision, torchvision_name

    data = np.load(npz)
    state = {k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")}
    torch_grads = {k[len("grad/"):]: data[k] for k in data.files if k.startswith("grad/")}
    with jax.enable_x64():
        params, stats = resnet_from_torchvision(state)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        model = build_encoder(f"resnet{depth}", replace_stride_with_dilation=tuple(dilate),
                              dtype=jnp.float64, param_dtype=jnp.float64)
        image = jnp.asarray(np.transpose(data["image"], (0, 2, 3, 1)), jnp.float64)

        def loss(p):
            feats, _ = model.apply({"params": p, "batch_stats": stats}, image, train=True,
                                   mutable=["batch_stats"])
            return sum(jnp.mean(jnp.square(f.astype(jnp.float64))) for f in feats)

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
    want, _ = resnet_from_torchvision(torch_grads)
    got_flat = traverse_util.flatten_dict(jax.device_get(grads))
    errors = {}
    for path, ref in traverse_util.flatten_dict(want).items():
        got = np.asarray(got_flat[path], np.float64)
        errors[torchvision_name("params", path)] = float(
            np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300))
    return {"loss": float(value), "errors": errors, "version": f"jax {jax.__version__}"}


def gradient_table(args) -> None:
    import tempfile

    print(f"\nfloat64 gradients, {args.size}, batch {args.batch}; loss = sum of the mean "
          "squares of the five features; relative error ||ours - torch|| / ||torch||\n")
    print("| encoder | loss torch | loss ours | conv1.weight | bn1.weight | bn1.bias "
          "| layer1 worst | all tensors worst (which) |")
    print("|---|---|---|---|---|---|---|---|")
    for depth in [int(d) for d in args.depths.split(",")]:
        dilate = [bool(int(v)) for v in args.dilate.split(",")] if depth >= 50 else [False] * 3
        with tempfile.TemporaryDirectory() as tmp:
            npz = os.path.join(tmp, "torch.npz")
            python = args.torch_python or sys.executable
            cmd = [python, os.path.abspath(__file__), "--side", "torch", "--gradients",
                   "--depths", str(depth), "--size", args.size, "--batch", str(args.batch),
                   "--dilate", args.dilate, "--out", npz]
            run = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if run.returncode != 0:
                raise SystemExit(f"torch side (resnet{depth}) failed:\n{run.stderr[-3000:]}")
            t = json.loads(run.stdout.strip().splitlines()[-1])
            j = jax_gradient_errors(depth, dilate, npz)
        err = j["errors"]
        layer1 = max(v for k, v in err.items() if k.startswith("layer1."))
        worst = max(err, key=err.get)
        dil = f", dilation {args.dilate}" if depth >= 50 else ""
        print(f"| ResNet-{depth}{dil} | {t['loss']:.10g} | {j['loss']:.10g} | "
              f"{err['conv1.weight']:.1e} | {err['bn1.weight']:.1e} | {err['bn1.bias']:.1e} | "
              f"{layer1:.1e} | {err[worst]:.1e} (`{worst}`) |", flush=True)
    print(f"\n{t['version']}, {j['version']}")


def jax_encoder_loss(depth: int, h: int, w: int, batch: int, dilate):
    """Our ResNet encoder and the loss both sides time: the mean squares of its five features
    with train-mode BatchNorm. Returns ``(loss(params, image), params, image)``; also used by
    ``benchmarks/encoder_ablation.py``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mtl_jax.models.encoders import build_encoder

    model = build_encoder(f"resnet{depth}", replace_stride_with_dilation=tuple(dilate))
    image = jnp.asarray(np.random.default_rng(0).normal(size=(batch, h, w, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), image, train=False)
    stats = variables["batch_stats"]

    def loss(params, x):
        feats, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
        return sum(jnp.mean(jnp.square(f.astype(jnp.float32))) for f in feats)

    return loss, variables["params"], image


def jax_side(depth: int, h: int, w: int, batch: int, dilate, steps: int) -> dict:
    import jax
    import numpy as np

    loss, params, image = jax_encoder_loss(depth, h, w, batch, dilate)
    step = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, image))
    compile_s = time.perf_counter() - t0
    seconds = _median_time(lambda: jax.block_until_ready(step(params, image)), steps)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return {"s": seconds, "params": n_params, "compile_s": compile_s,
            "version": f"jax {jax.__version__}"}


def _conv_spec(spec: str) -> tuple[int, ...]:
    n, h, w, c_in, k, c_out = (int(v) for v in spec.split(":"))
    return n, h, w, c_in, k, c_out


def _torch_conv(spec: str, steps: int) -> dict:
    import torch

    n, h, w, c_in, k, c_out = _conv_spec(spec)
    x = torch.randn(n, c_in, h, w, requires_grad=True)
    conv = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)

    def forward():
        with torch.no_grad():
            conv(x)

    def forward_backward():
        x.grad = None
        conv.weight.grad = None
        conv(x).square().sum().backward()

    return {"fwd": _median_time(forward, steps), "both": _median_time(forward_backward, steps)}


def torch_convs(specs: list[str], threads: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    return {"convs": {spec: _torch_conv(spec, steps) for spec in specs},
            "version": f"torch {torch.__version__}"}


def _jax_conv(spec: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mtl_jax.models import cpu_grads

    nhwc = ("NHWC", "HWIO", "NHWC")
    n, h, w, c_in, k, c_out = _conv_spec(spec)
    pad = ((k // 2, k // 2), (k // 2, k // 2))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, h, w, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)) * 0.02, jnp.float32)

    def grads(conv):
        def loss(x_, k_):
            return jnp.sum(jnp.square(conv(x_, k_, (1, 1), pad, dimension_numbers=nhwc)))
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return lambda: jax.block_until_ready(step(x, kernel))

    forward = jax.jit(lambda x_, k_: jax.lax.conv_general_dilated(
        x_, k_, (1, 1), pad, dimension_numbers=nhwc))
    return {
        "fwd": _median_time(lambda: jax.block_until_ready(forward(x, kernel)), steps),
        "both": _median_time(grads(cpu_grads.conv_general_dilated), steps),
        "both_xla": _median_time(grads(jax.lax.conv_general_dilated), steps),
        "taps": cpu_grads.taps_pay_off(kernel.shape),
    }


def jax_convs(specs: list[str], steps: int) -> dict:
    import jax

    return {"convs": {spec: _jax_conv(spec, steps) for spec in specs},
            "version": f"jax {jax.__version__}"}


def _run_side(side: str, args, depth: int) -> dict:
    python = args.torch_python if side == "torch" and args.torch_python else sys.executable
    cmd = [python, os.path.abspath(__file__), "--side", side, "--depths", str(depth),
           "--size", args.size, "--batch", str(args.batch), "--dilate", args.dilate,
           "--threads", str(args.threads), "--steps", str(args.steps)]
    if args.convs:
        cmd += ["--convs", args.convs]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{side} side (resnet{depth}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def conv_table(args) -> None:
    rounds = [(_run_side("torch", args, 0), _run_side("jax", args, 0))
              for _ in range(args.rounds)]
    print(f"\nsingle convolutions, float32, {args.threads} threads, {os.cpu_count()} CPU cores; "
          f"median of {args.steps} calls, median of {args.rounds} alternating rounds; ms\n")
    print("| N:H:W:Cin:K:Cout | torch fwd | ours fwd | torch fwd+bwd | ours fwd+bwd "
          "| ours / torch | ours with XLA's gradients | taps |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.convs.split(","):
        def med(side: int, key: str, spec: str = spec) -> float:
            return 1000 * statistics.median(r[side]["convs"][spec][key] for r in rounds)
        tf, jf, tb, jb, jx = (med(0, "fwd"), med(1, "fwd"), med(0, "both"), med(1, "both"),
                              med(1, "both_xla"))
        taps = rounds[0][1]["convs"][spec]["taps"]
        print(f"| {spec} | {tf:.1f} | {jf:.1f} | {tb:.1f} | {jb:.1f} | {jb / tb:.2f} | "
              f"{jx:.1f} | {'yes' if taps else 'no'} |", flush=True)
    print(f"\n{rounds[0][0]['version']}, {rounds[0][1]['version']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="18,34,50,101")
    p.add_argument("--size", default="224x288")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dilate", default="0,0,1",
                   help="replace_stride_with_dilation for layer2..4 (ResNet-50/101 only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--torch_python", default="", help="interpreter for the torch side")
    p.add_argument("--convs", default="",
                   help="single convolutions N:H:W:CIN:K:COUT,... instead of encoders")
    p.add_argument("--gradients", action="store_true",
                   help="compare float64 gradients against torchvision instead of timing")
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    depths = [int(d) for d in args.depths.split(",")]
    if args.side == "torch" and args.gradients:
        depth = depths[0]
        dilate = [bool(int(v)) for v in args.dilate.split(",")] if depth >= 50 else [False] * 3
        print(json.dumps(torch_gradients(depth, h, w, args.batch, dilate, args.out)))
        return
    if args.gradients:
        gradient_table(args)
        return
    if args.side and args.convs:
        specs = args.convs.split(",")
        result = (torch_convs(specs, args.threads, args.steps) if args.side == "torch"
                  else jax_convs(specs, args.steps))
        print(json.dumps(result))
        return
    if args.side:
        depth = depths[0]
        dilate = [bool(int(v)) for v in args.dilate.split(",")] if depth >= 50 else [False] * 3
        if args.side == "torch":
            result = torch_side(depth, h, w, args.batch, dilate, args.threads, args.steps)
        else:
            result = jax_side(depth, h, w, args.batch, dilate, args.steps)
        print(json.dumps(result))
        return
    if args.convs:
        conv_table(args)
        return
    print(f"\n{args.size}, batch {args.batch}, {args.threads} threads, float32, "
          f"{os.cpu_count()} CPU cores; median of {args.steps} steps, median of "
          f"{args.rounds} alternating rounds\n")
    print("| encoder | parameters | torchvision s | ours s | ours / torch | per round "
          "| ours compile s |")
    print("|---|---|---|---|---|---|---|")
    for depth in depths:
        torch_s, jax_s, compile_s, info = [], [], [], {}
        for _ in range(args.rounds):
            t = _run_side("torch", args, depth)
            j = _run_side("jax", args, depth)
            torch_s.append(t["s"])
            jax_s.append(j["s"])
            compile_s.append(j["compile_s"])
            info = {"torch": t, "jax": j}
        if info["torch"]["params"] != info["jax"]["params"]:
            print(f"warning: parameter counts differ: torch {info['torch']['params']:,} "
                  f"ours {info['jax']['params']:,}", file=sys.stderr)
        ts, js = statistics.median(torch_s), statistics.median(jax_s)
        dil = f", dilation {args.dilate}" if depth >= 50 else ""
        per_round = " / ".join(f"{j / t:.2f}" for t, j in zip(torch_s, jax_s))
        print(f"| ResNet-{depth}{dil} | {info['jax']['params']:,} | {ts:.3f} | {js:.3f} | "
              f"{js / ts:.2f} | {per_round} | {statistics.median(compile_s):.1f} |", flush=True)
    print(f"\n{info['torch']['version']}, {info['jax']['version']}")


if __name__ == "__main__":
    main()
