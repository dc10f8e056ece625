"""Naive vs blocked (online-softmax, rematerialised) attention: values, gradients, memory."""

import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models.attention import IMPLS, attention, blocked_attention, naive_attention


def _qkv(key, batch, n, m, c, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (batch, n, c), jnp.float32).astype(dtype),
        jax.random.normal(kk, (batch, m, c), jnp.float32).astype(dtype),
        jax.random.normal(kv, (batch, m, d), jnp.float32).astype(dtype),
    )


# (batch, N, M, C, D, block_q, block_k)
CASES = [
    (1, 64, 64, 8, 8, 16, 16),  # evenly divisible, several blocks each way
    (2, 50, 37, 8, 5, 16, 12),  # ragged N and M (37 = 3 * 12 + 1: one real key in last block)
    (2, 33, 65, 4, 6, 32, 32),  # ragged, remainder 1 on both axes
    (3, 20, 30, 6, 3, 64, 128),  # block sizes larger than the lengths: a single block
    (1, 7, 90, 5, 9, 3, 64),  # N != M, D != C, tiny query blocks, 90 % 64 = 26
]


def _value_and_grads(fn, q, k, v, weights):
    """``fn(q, k, v)`` and the gradients of ``sum(fn(q, k, v) * weights)`` w.r.t. q, k, v."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_N{}_M{}_C{}_D{}_bq{}_bk{}".format(*c))
def test_blocked_matches_naive_values_and_gradients(case):
    batch, n, m, c, d, bq, bk = case
    q, k, v = _qkv(jax.random.PRNGKey(n * 1000 + m), batch, n, m, c, d)
    weights = jax.random.normal(jax.random.PRNGKey(3), (batch, n, d))
    scale = c**-0.5

    want, want_grads = _value_and_grads(
        lambda q, k, v: naive_attention(q, k, v, scale=scale), q, k, v, weights
    )
    got, got_grads = _value_and_grads(
        lambda q, k, v: blocked_attention(q, k, v, scale=scale, block_q=bq, block_k=bk),
        *(q, k, v, weights),
    )
    assert got.shape == (batch, n, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5, err_msg=f"d/d{name}")


def test_padded_keys_get_no_weight():
    # M = 13 with block_k = 4: three full blocks and one block holding a single real key. The
    # result must equal attention over exactly the 13 keys; large keys/values make any leaked
    # weight on padding visible, and a single-key input must return that key's value exactly.
    q, k, v = _qkv(jax.random.PRNGKey(0), 2, 9, 13, 4, 3)
    k, v = 10.0 * k, 100.0 * v
    got = blocked_attention(q, k, v, scale=0.5, block_q=4, block_k=4)
    np.testing.assert_allclose(got, naive_attention(q, k, v, scale=0.5), rtol=1e-5, atol=1e-3)

    one = blocked_attention(q, k[:, :1], v[:, :1], scale=0.5, block_q=4, block_k=4)
    np.testing.assert_array_equal(one, jnp.broadcast_to(v[:, :1], (2, 9, 3)))


def test_bfloat16_inputs():
    q, k, v = _qkv(jax.random.PRNGKey(1), 2, 45, 70, 16, 8)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = blocked_attention(q16, k16, v16, scale=0.25, block_q=16, block_k=32)
    assert got.dtype == jnp.bfloat16 and got.shape == (2, 45, 8)
    want = naive_attention(q, k, v, scale=0.25)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=5e-2, atol=5e-2)
    assert naive_attention(q16, k16, v16, scale=0.25).dtype == jnp.bfloat16


def test_dispatch_and_invalid_impl():
    q, k, v = _qkv(jax.random.PRNGKey(2), 1, 10, 11, 4, 4)
    want = naive_attention(q, k, v, scale=0.5)
    for impl in IMPLS:
        got = attention(q, k, v, scale=0.5, impl=impl, block_q=4, block_k=4)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="naive.*blocked"):
        attention(q, k, v, scale=0.5, impl="flash")


def test_invalid_arguments():
    q, k, v = _qkv(jax.random.PRNGKey(2), 1, 10, 11, 4, 4)
    with pytest.raises(ValueError, match="block_k"):
        blocked_attention(q, k, v, scale=0.5, block_k=0)
    with pytest.raises(ValueError, match="channel"):
        naive_attention(q, k[..., :3], v, scale=0.5)
    with pytest.raises(ValueError, match="lengths"):
        blocked_attention(q, k, v[:, :5], scale=0.5)


N_MEM = 4096
C_MEM = 32


def _grad_temp_bytes(fn):
    spec = jax.ShapeDtypeStruct((1, N_MEM, C_MEM), jnp.float32)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, scale=C_MEM**-0.5) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("memory_analysis() unavailable on this backend")
    return stats.temp_size_in_bytes


def test_blocked_gradient_memory_is_small():
    # Naive keeps [4096, 4096] float32 matrices (64 MiB each) alive for the backward pass.
    naive = _grad_temp_bytes(naive_attention)
    blocked = _grad_temp_bytes(blocked_attention)  # default 1024 x 1024 blocks
    print(f"grad temp bytes at N=M={N_MEM}: naive {naive}, blocked {blocked}")
    assert naive >= N_MEM * N_MEM * 4
    assert blocked < naive / 4


def test_blocked_saves_no_score_sized_residuals(capsys):
    # Structural check independent of the backend: nothing autodiff keeps for the backward
    # pass has N * M elements (the inner residuals are recomputed per query block).
    n, m = 512, 384
    q, k, v = _qkv(jax.random.PRNGKey(4), 1, n, m, 8, 8)

    def residual_sizes(fn):
        jax.ad_checkpoint.print_saved_residuals(lambda q, k, v: jnp.sum(fn(q, k, v)), q, k, v)
        shapes = re.findall(r"\w+\[([\d,]*)\]", capsys.readouterr().out)
        return [int(np.prod([int(s) for s in shape.split(",") if s])) for shape in shapes]

    naive = residual_sizes(lambda q, k, v: naive_attention(q, k, v, scale=0.3))
    assert max(naive) >= n * m  # the check can see a score-sized residual
    blocked = residual_sizes(
        lambda q, k, v: blocked_attention(q, k, v, scale=0.3, block_q=128, block_k=128)
    )
    assert blocked and max(blocked) < n * m
