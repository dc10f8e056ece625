"""Where ``mtl-jax`` commands put JAX's persistent compilation cache (on by default)."""

import os
import subprocess
import sys

from mtl_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_flag_environment_and_default(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve(None) == str(tmp_path / "xdg" / "mtl_jax" /
                                              "jax_compilation_cache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve("") == str(tmp_path / "home" / ".cache" / "mtl_jax" /
                                            "jax_compilation_cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compile_cache.resolve(None) == str(tmp_path / "env")
    assert compile_cache.resolve(str(tmp_path / "flag")) == str(tmp_path / "flag")  # flag wins
    for off in ("off", "OFF", "none"):
        assert compile_cache.resolve(off) is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    assert compile_cache.resolve(None) is None


def _command_then_compile(extra, env):
    """Run ``mtl-jax params`` in a fresh process (it sets the cache up, as every training
    command does), then compile one small program in the same process."""
    code = ("import sys, jax, jax.numpy as jnp\n"
            "from mtl_jax.main import main\n"
            f"rc = main(['params', '--config=configs/quickstart.py:smoke', *{extra!r}])\n"
            "assert rc == 0, rc\n"
            "jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_commands_switch_the_default_cache_on(tmp_path):
    """With no cache settings a command's compiled programs land in the user cache;
    ``--compilation_cache=off`` stores none, ``--compilation_cache=DIR`` moves it."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), XLA_FLAGS="", JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cache = tmp_path / "xdg" / "mtl_jax" / "jax_compilation_cache"
    _command_then_compile(["--compilation_cache=off"], env)
    assert not cache.exists() or not os.listdir(cache)
    _command_then_compile([], env)
    assert os.listdir(cache), "no compiled program was cached"
    _command_then_compile([f"--compilation_cache={tmp_path / 'mine'}"], env)
    assert os.listdir(tmp_path / "mine")
