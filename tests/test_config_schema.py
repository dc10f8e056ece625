"""The config schema (mtl_jax/config_schema.py) and a fuzz test of the command line.

The fuzz test runs ``mtl-jax train/eval/predict/compare/params`` in-process
(:func:`mtl_jax.main.main`) with hostile values from a seeded generator and asserts the
command's contract: success (exit 0), or one line ``mtl-jax: error: ...`` with exit code 1 or 2
and no traceback; a refused ``train`` writes no checkpoint and no ``config.json`` (a run refused
by the schema not even its workdir). Most cases are refused before anything is compiled.
"""

import contextlib
import io
import os
import random
import re
import time

import ml_collections
import pytest

from mtl_jax import config_schema
from mtl_jax.errors import UserError
from mtl_jax.main import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/quickstart.py:smoke"


def _run(args):
    """``(exit code, stdout, stderr)`` of ``mtl-jax ARGS`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


def _error_line(code, err, args):
    assert code in (1, 2), (args, code, err[-2000:])
    assert "Traceback" not in err, (args, err[-3000:])
    lines = [x for x in err.splitlines() if x.startswith("mtl-jax: error: ")]
    assert len(lines) == 1, (args, err[-2000:])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The rules


def _quickstart(arg="smoke"):
    import importlib.util

    spec = importlib.util.spec_from_file_location("qs", os.path.join(REPO, "configs",
                                                                     "quickstart.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize("key,value,message", [
    ("eval_batch_size", 0, "config.eval_batch_size=0: must be an integer >= 1 "
                           "(e.g. --config.eval_batch_size=8)"),
    ("num_train_steps", -5, "config.num_train_steps=-5: must be an integer >= 1"),
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps=0: must be an integer >= 1"),
    ("optimizer.learning_rate", float("nan"),
     "config.optimizer.learning_rate=nan: must be a finite number > 0 "
     "(e.g. --config.optimizer.learning_rate=0.001)"),
    ("optimizer.b2", 1.0, "config.optimizer.b2=1.0: must be a finite number >= 0 and < 1"),
    ("input_size", (32,), "config.input_size=(32,): must be 2 integers >= 1"),
    ("label_check", "warning", "config.label_check='warning': must be one of 'error', 'warn'"),
    ("weighting.weights.depth", float("inf"), "config.weighting.weights.depth=inf: must be a "
                                              "finite number >= 0"),
    ("batch_size", True, "config.batch_size=True: must be an integer >= 1"),
    ("model.encoder", "resnet19", "config.model.encoder='resnet19': must be one of the "
                                  "encoders of `mtl_jax.models.ENCODERS`"),
    ("augment.crop_size", (512,), "config.augment.crop_size=(512,): must be 2 integers >= 1, "
                                  "or None (e.g. --config.augment.crop_size=(512, 512))"),
])
def test_a_broken_rule_is_one_line_naming_key_value_rule_and_example(key, value, message):
    config = _quickstart()
    config_schema.check(config)  # the smoke config itself passes
    with config.unlocked():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        node[leaf] = value
    with pytest.raises(UserError) as e:
        config_schema.check(config)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert "(e.g. --config." in str(e.value)


def test_rules_between_keys():
    config = _quickstart()
    with pytest.raises(UserError, match=r"config.batch_size=8 is not divisible by the 3 devices"):
        config_schema.check(config, devices=(3, 1))
    config_schema.check(config, devices=(4, 1))
    config.optimizer.schedule = "step"
    config.optimizer.decay_steps = (4, 2)
    with pytest.raises(UserError, match=r"decay_steps=\(4, 2\) with config.num_train_steps=6: "
                                        "the decay boundaries must increase strictly"):
        config_schema.check(config)
    config.optimizer.decay_steps = (6,)  # at the end of the run: never applied
    with pytest.raises(UserError, match="between 0 and 6"):
        config_schema.check(config)
    config.optimizer.decay_steps = (2, 5)
    config_schema.check(config)
    config.optimizer.warmup_steps = 6
    with pytest.raises(UserError, match="warmup_steps=6 must be below config.num_train_steps=6"):
        config_schema.check(config)
    staged = ml_collections.ConfigDict(dict(num_train_steps=1, batch_size=2, input_size=(8, 8),
                                            model=dict(stage_switch=0.5)))
    with pytest.raises(UserError, match="puts the stage switch at step 0, outside the run"):
        config_schema.check(staged)
    staged.num_train_steps = 4
    config_schema.check(staged)
    uda = ml_collections.ConfigDict(dict(num_train_steps=4, batch_size=6, input_size=(8, 8),
                                         uda=dict(lambda_adv=0.1)))
    with pytest.raises(UserError, match="each half divisible by the 2 devices"):
        config_schema.check(uda, devices=(2, 1))
    missing = ml_collections.ConfigDict(dict(batch_size=2, input_size=(8, 8)))
    with pytest.raises(UserError, match="config.num_train_steps is missing"):
        config_schema.check(missing)


def test_docs_list_the_generated_rules():
    text = open(os.path.join(REPO, "docs", "reliability.md"), encoding="utf-8").read()
    table = re.search(r"<!-- config-schema:begin -->\n(.*)<!-- config-schema:end -->", text,
                      re.S)
    assert table, "docs/reliability.md lost its config-schema markers"
    assert table.group(1) == config_schema.markdown_table(), (
        "docs/reliability.md's schema tables are stale: paste `python -m mtl_jax.config_schema`")


# ---------------------------------------------------------------------------------------------
# The reproductions: one line, the right exit code, nothing written


@pytest.mark.parametrize("override,code,start", [
    ("--config.eval_batch_size=0", 1, "config.eval_batch_size=0: must be an integer >= 1"),
    ("--config.num_train_steps=-5", 1, "config.num_train_steps=-5: must be"),
    ("--config.num_train_steps=0", 1, "config.num_train_steps=0: must be"),
    ("--config.batch_size=0", 1, "config.batch_size=0: must be"),
    ("--config.checkpoint_every_steps=0", 1, "config.checkpoint_every_steps=0: must be"),
    ("--config.batch_size=abc", 2, "flag --config.batch_size=abc: invalid literal for int()"),
    ("--config.modle.dtype=float32", 2, "unknown config key 'modle' Did you mean \"model\""),
])
def test_reproductions_end_in_one_line_before_the_workdir_exists(tmp_path, override, code,
                                                                 start):
    wd = tmp_path / "wd"
    args = ["train", SMOKE, override, f"--workdir={wd}"]
    got, _, err = _run(args)
    assert got == code
    assert _error_line(got, err, args).startswith("mtl-jax: error: " + start)
    assert not wd.exists()


def test_config_files_that_do_not_load_are_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    return {}['x']\n")
    wd = tmp_path / "wd"
    for config, message in [
            ("no_such_file.py", "--config=no_such_file.py: the config file 'no_such_file.py' "
                                "does not exist"),
            (str(tmp_path), "is not a file"),
            (str(bad), f"--config={bad} cannot be loaded: {bad}, line 1: invalid syntax"),
            (str(raising), f"--config={raising} cannot be loaded: KeyError: 'x'")]:
        args = ["train", f"--config={config}", f"--workdir={wd}"]
        code, _, err = _run(args)
        assert message in _error_line(code, err, args) and code == 2
        assert not wd.exists()


def test_in_process_calls_read_their_own_overrides():
    """main(argv) parses argv's --config.key overrides (not sys.argv's), and an override of
    one call does not leak into the next."""
    code, out, _ = _run(["params", SMOKE, "--config.model.encoder_kwargs.width=8"])
    assert code == 0
    wide = out.splitlines()[-1]
    code, out, _ = _run(["params", SMOKE])
    assert code == 0 and out.splitlines()[-1] != wide


# ---------------------------------------------------------------------------------------------
# Fuzz

_COUNT = ["0", "-1", "-7", "nan", "inf", "abc", "", "1.5", "(1, 2)", "None"]
_REAL = ["0", "-1", "nan", "inf", "-inf", "1e400", "abc", "", "(1, 2)", "None"]
_CHOICE = ["", "nosuch", "0", "ADAM", "None"]
_SEQ = ["()", "(0, 0)", "(-1, 5)", "abc", "(nan,)", "0", "(32,)", "(1e400, 2)"]
_HUGE = "123456789012345678901234567890"
#: key -> hostile values; keys whose huge values are valid and cheap also get a huge one.
_KEYS = {
    **{k: _COUNT for k in ("batch_size", "eval_batch_size", "num_train_steps",
                           "model.encoder_kwargs.width", "model.decoder_kwargs.features",
                           "tasks.semseg.num_classes", "dataset.options.num_val")},
    **{k: _COUNT + [_HUGE] for k in ("checkpoint_every_steps", "eval_every_steps",
                                     "log_every_steps", "keep_checkpoints", "prefetch",
                                     "num_devices", "seed", "num_vis_examples")},
    **{k: _REAL for k in ("optimizer.learning_rate", "optimizer.b1", "optimizer.min_lr_ratio",
                          "optimizer.warmup_steps")},
    **{k: _CHOICE for k in ("optimizer.name", "optimizer.schedule", "weighting.name",
                            "label_check", "model.dtype", "model.encoder", "eval.compat",
                            "dataset.name")},
    **{k: _SEQ for k in ("input_size", "augment.scales", "optimizer.decay_steps")},
}
_PATHS = ["{tmp}/missing", "{tmp}/a_file", "{tmp}/a_file/below", "", "{tmp}/empty"]


def _fuzz_cases(rng, tmp, run_dir, n):
    """``n`` argument lists: one to two hostile overrides of train/params, or hostile flags and
    paths of eval/predict/compare."""
    cases = []
    for i in range(n):
        command = rng.choice(["train", "train", "train", "params", "eval", "predict",
                              "compare"])
        path = rng.choice(_PATHS).format(tmp=tmp)
        if command in ("train", "params"):
            keys = rng.sample(sorted(_KEYS), rng.choice([1, 1, 2]))
            args = [command, SMOKE] + [f"--config.{k}={rng.choice(_KEYS[k])}" for k in keys]
            if command == "train":
                args.append(f"--workdir={tmp}/train{i}")
        elif command == "eval":
            args = ["eval", SMOKE, f"--workdir={rng.choice([run_dir, path])}",
                    f"--step={rng.choice(['-1', '0', '3', 'abc', _HUGE, '2'])}"]
        elif command == "predict":
            args = ["predict", f"--workdir={rng.choice([run_dir, path])}",
                    f"--images={rng.choice([path, run_dir, run_dir + '/*.nothing'])}",
                    f"--out={rng.choice([path, f'{tmp}/a_file', f'{tmp}/out{i}'])}",
                    f"--step={rng.choice(['-1', '0', 'abc', _HUGE])}"]
        else:
            args = ["compare", rng.choice([run_dir, path]), rng.choice([path, run_dir]),
                    f"--baseline={rng.choice([path, run_dir, ',', ''])}"]
        cases.append(args)
    return cases


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """A finished 2-step smoke run (checkpoint of step 2) for eval/predict/compare."""
    wd = str(tmp_path_factory.mktemp("fuzz") / "run")
    code, _, err = _run(["train", SMOKE, f"--data_dir={data_dir}", f"--workdir={wd}",
                         "--config.num_train_steps=2", "--config.checkpoint_every_steps=2",
                         "--config.eval_every_steps=2", "--config.num_vis_examples=0"])
    assert code == 0, err[-3000:]
    return wd


N_FUZZ = 60


def test_cli_fuzz_each_case_succeeds_or_is_one_line(trained_run, data_dir, tmp_path):
    tmp = str(tmp_path)
    (tmp_path / "a_file").write_text("not a run")
    (tmp_path / "empty").mkdir()
    rng = random.Random(27)
    cases = _fuzz_cases(rng, tmp, trained_run, N_FUZZ)
    t0 = time.perf_counter()
    outcomes = {0: 0, 1: 0, 2: 0}
    for args in cases:
        if args[0] in ("train", "eval"):
            args = [*args, f"--data_dir={data_dir}"]
        code, _, err = _run(args)
        outcomes[code] = outcomes.get(code, 0) + 1
        if code != 0:
            line = _error_line(code, err, args)
        if args[0] == "train" and code != 0:
            wd = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
            assert not os.path.exists(os.path.join(wd, "config.json")), (args, line)
            assert not os.path.exists(os.path.join(wd, "checkpoints")), (args, line)
            if line.startswith("mtl-jax: error: config."):  # the schema: nothing at all
                assert not os.path.exists(wd), (args, line)
    elapsed = time.perf_counter() - t0
    print(f"CLI fuzz: {len(cases)} cases in {elapsed:.1f} s, exit codes {outcomes}")
    assert outcomes[1] + outcomes[2] >= len(cases) // 2  # mostly refusals (before compiling)
