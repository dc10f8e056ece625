"""JAX's persistent compilation cache, on by default for ``mtl-jax`` commands.

A restarted or resumed run compiles the same programs again (a preempted TPU job, a second
eval, the next run of a sweep with the same model); with the cache they are read back from
disk instead. JAX keys each entry by the program, the compiler options, the device kind and
the JAX version, so a stale entry is never used.

Where (first that applies):

1. ``--compilation_cache=DIR`` (``off`` switches it off);
2. ``$JAX_COMPILATION_CACHE_DIR`` (JAX's own variable; ``""`` switches it off);
3. ``$XDG_CACHE_HOME/mtl_jax/jax_compilation_cache`` (default ``~/.cache/...``).

Only programs that took at least ``min_compile_time_s`` to compile are stored (tiny
programs are faster to compile than to read). docs/benchmarks.md, "Compile time of a
restarted run", measures the effect.
"""

from __future__ import annotations

import os

OFF = ("off", "none", "false", "0")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mtl_jax", "jax_compilation_cache")


def resolve(flag: str | None) -> str | None:
    """The cache directory the flag and environment ask for, or ``None`` for off."""
    if flag:
        return None if flag.strip().lower() in OFF else flag
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        env = os.environ["JAX_COMPILATION_CACHE_DIR"]
        return env if env and env.strip().lower() not in OFF else None
    return default_dir()


def enable(flag: str | None = None, min_compile_time_s: float | None = None) -> str | None:
    """Point JAX's persistent compilation cache at :func:`resolve`'s directory (before the
    first compilation). Returns the directory, or ``None`` when switched off."""
    import jax

    path = resolve(flag)
    if path is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    if min_compile_time_s is None:
        min_compile_time_s = float(os.environ.get(
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    return path
