"""Softmax attention over spatial positions, naive and memory-efficient (blocked).

The correlation-guided attention of DenseMTL's xTAM module attends from every spatial position
of one feature map to every position of another: with ``N = h * w`` queries and ``M`` keys
(e.g. 56 x 72 = 4032 of each per image) it computes::

    out[b, i] = sum_j softmax_j(scale * <q[b, i], k[b, j]>) * v[b, j]

Shapes convention: array names carry their shape as a suffix, ``q_BxNxC`` (batch, queries,
channels), ``k_BxMxC`` (batch, keys, channels), ``v_BxMxD`` (batch, keys, value channels); the
result is ``[B, N, D]`` in the dtype of ``v``. Queries and keys must share ``C``; ``D`` may
differ. Spatial maps are flattened to sequences by the caller (``x.reshape(B, h * w, C)``).

Implementations (``attention(..., impl=...)`` dispatches):

* ``naive_attention`` materialises the ``[B, N, M]`` float32 score matrix, takes a float32
  softmax over the key axis and multiplies by ``v``. Forward memory is ``O(B * N * M)``, and
  autodiff keeps the ``[B, N, M]`` probabilities (plus, depending on fusion, the scores) alive
  for the backward pass: 64 MiB per image for N = M = 4096, per attention module.

* ``blocked_attention`` computes the same function without ever forming the full matrix.
  Queries are split into blocks of ``block_q`` rows (an outer ``lax.map``) and, for each query
  block, keys/values into blocks of ``block_k`` rows (an inner ``lax.scan``) combined with the
  online-softmax recurrence. For a query block with running row maximum ``m``, running
  normaliser ``l`` and running (unnormalised) output ``acc``, each key block with float32
  scores ``s = scale * q k^T`` updates::

      m_new = max(m, max_j s)              # row-wise
      p     = exp(s - m_new)               # [block_q, block_k]
      alpha = exp(m - m_new)               # rescales what was accumulated so far
      l     = alpha * l + sum_j p
      acc   = alpha * acc + p @ v_block

  and the block's output is ``acc / l``. Since the result does not depend on the choice of
  ``m`` (it cancels between ``acc`` and ``l``), ``m`` is treated as a constant for
  differentiation (``stop_gradient``), which is exact and saves backward work.

  Memory. Forward: one ``[B, block_q, block_k]`` score block at a time plus the carries, i.e.
  ``O(B * block_q * (block_k + D))`` working memory besides inputs and output. Backward: both
  scanned bodies are wrapped in ``jax.checkpoint`` with the ``nothing_saveable`` policy, so
  autodiff stores no score or probability blocks. The outer map keeps only its inputs (the
  query blocks; keys and values are loop invariants); when the backward pass reaches a query
  block it re-runs that block's key scan, which keeps the per-step carries ``(m, l, acc)`` --
  ``O(num_key_blocks * B * block_q * D)`` -- and then recomputes every score block again while
  stepping backwards. Peak memory therefore grows linearly with the number of key blocks
  instead of with ``N * M``; the price is recomputing the scores (about two extra forward
  passes' worth of ``q k^T`` in the backward).

Ragged lengths: ``N`` and ``M`` need not be multiples of the block sizes. Queries are
zero-padded and the padded rows sliced off the result; keys/values are zero-padded and the
padded keys' scores replaced by a large negative float32 value (``-1e30``), so their weights
``exp(-1e30 - m)`` are exactly zero (every key block holds at least one real key, so ``m``
is always a real score). A block size ``>=`` the length gives a single block.

Precision: scores are computed with float32 accumulation (``preferred_element_type``) and the
softmax statistics are float32 whatever the input dtype. For the ``p @ v`` product the
probabilities are cast to ``v``'s dtype (a no-op for float32 inputs; for bfloat16 this is the
usual tensor-core-friendly choice) and accumulated in float32; the result is cast back to
``v``'s dtype. Both implementations follow the same convention, so they agree to float32
round-off for float32 inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

#: Valid values of ``attention(..., impl=...)``.
IMPLS = ("naive", "blocked")

# Score given to padded keys: exp(_MASK_VALUE - m) underflows to exactly 0 in float32 for any
# real running maximum m, and unlike -inf it cannot produce inf - inf = nan.
_MASK_VALUE = -1e30


def _check_shapes(q_BxNxC: jax.Array, k_BxMxC: jax.Array, v_BxMxD: jax.Array) -> None:
    for name, x in (("q", q_BxNxC), ("k", k_BxMxC), ("v", v_BxMxD)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have rank 3 ([B, length, channels]), got {x.shape}")
    (bq, _, c_q), (bk, m_k, c_k), (bv, m_v, _) = q_BxNxC.shape, k_BxMxC.shape, v_BxMxD.shape
    if not bq == bk == bv:
        raise ValueError(f"batch sizes differ: q {bq}, k {bk}, v {bv}")
    if c_q != c_k:
        raise ValueError(f"q and k channel counts differ: {c_q} vs {c_k}")
    if m_k != m_v:
        raise ValueError(f"k and v lengths differ: {m_k} vs {m_v}")


def _scores(q_BxNxC: jax.Array, k_BxMxC: jax.Array, scale: float) -> jax.Array:
    """``scale * q k^T`` in float32 (float32 accumulation whatever the input dtype)."""
    s_BxNxM = jnp.einsum("bnc,bmc->bnm", q_BxNxC, k_BxMxC, preferred_element_type=jnp.float32)
    return s_BxNxM * jnp.float32(scale)


def _weighted_sum(p_BxNxM: jax.Array, v_BxMxD: jax.Array) -> jax.Array:
    """``p @ v`` with p cast to v's dtype and float32 accumulation."""
    return jnp.einsum(
        "bnm,bmd->bnd", p_BxNxM.astype(v_BxMxD.dtype), v_BxMxD, preferred_element_type=jnp.float32
    )


def naive_attention(
    q_BxNxC: jax.Array, k_BxMxC: jax.Array, v_BxMxD: jax.Array, *, scale: float
) -> jax.Array:
    """``softmax_keys(scale * q k^T) @ v`` with the full ``[B, N, M]`` matrix; ``[B, N, D]``.

    The softmax is taken in float32; the result has ``v``'s dtype. Memory is ``O(B * N * M)``
    in the forward pass and the probabilities are kept for the backward pass.
    """
    _check_shapes(q_BxNxC, k_BxMxC, v_BxMxD)
    p_BxNxM = jax.nn.softmax(_scores(q_BxNxC, k_BxMxC, scale), axis=-1)
    return _weighted_sum(p_BxNxM, v_BxMxD).astype(v_BxMxD.dtype)


def _pad_axis1(x: jax.Array, length: int) -> jax.Array:
    """Zero-pad axis 1 of ``x`` to ``length``."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, extra), (0, 0)))


def _to_blocks(x_BxLxC: jax.Array, block: int) -> jax.Array:
    """``[B, nb * block, C] -> [nb, B, block, C]`` (block index leading, for scanning)."""
    b, length, c = x_BxLxC.shape
    return x_BxLxC.reshape(b, length // block, block, c).transpose(1, 0, 2, 3)


def _check_block(name: str, block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{name} must be a positive int, got {block!r}")


def blocked_attention(
    q_BxNxC: jax.Array,
    k_BxMxC: jax.Array,
    v_BxMxD: jax.Array,
    *,
    scale: float,
    block_q: int = 1024,
    block_k: int = 1024,
) -> jax.Array:
    """Memory-efficient ``softmax_keys(scale * q k^T) @ v``; ``[B, N, D]`` in ``v``'s dtype.

    Same function as ``naive_attention`` computed over ``block_q x block_k`` tiles with the
    online-softmax recurrence (see the module docstring). Scanned bodies are rematerialised in
    the backward pass, so neither pass stores an ``N x M`` matrix: residuals per query block
    are ``O(num_key_blocks * B * block_q * D)``. ``N`` and ``M`` need not be multiples of the
    block sizes; a block size ``>=`` the length means a single block.
    """
    _check_shapes(q_BxNxC, k_BxMxC, v_BxMxD)
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    batch, n, _ = q_BxNxC.shape
    m_len, d = v_BxMxD.shape[1], v_BxMxD.shape[2]
    out_dtype = v_BxMxD.dtype

    bq, bk = min(block_q, n), min(block_k, m_len)
    nq, nk = -(-n // bq), -(-m_len // bk)

    q_QxBxbqxC = _to_blocks(_pad_axis1(q_BxNxC, nq * bq), bq)
    k_KxBxbkxC = _to_blocks(_pad_axis1(k_BxMxC, nk * bk), bk)
    v_KxBxbkxD = _to_blocks(_pad_axis1(v_BxMxD, nk * bk), bk)
    key_valid_Kxbk = (jnp.arange(nk * bk) < m_len).reshape(nk, bk)
    needs_mask = nk * bk != m_len

    def query_block(q_BxbqxC: jax.Array) -> jax.Array:
        @functools.partial(
            jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False
        )
        def key_step(carry, xs):
            m_Bxbq, l_Bxbq, acc_BxbqxD = carry
            k_BxbkxC, v_BxbkxD, valid_bk = xs
            s_Bxbqxbk = _scores(q_BxbqxC, k_BxbkxC, scale)
            if needs_mask:
                s_Bxbqxbk = jnp.where(valid_bk[None, None, :], s_Bxbqxbk, _MASK_VALUE)
            # The result is invariant to the choice of m: no gradient needs to flow through it.
            m_new = jax.lax.stop_gradient(jnp.maximum(m_Bxbq, jnp.max(s_Bxbqxbk, axis=-1)))
            alpha_Bxbq = jnp.exp(m_Bxbq - m_new)
            p_Bxbqxbk = jnp.exp(s_Bxbqxbk - m_new[..., None])
            l_new = alpha_Bxbq * l_Bxbq + jnp.sum(p_Bxbqxbk, axis=-1)
            acc_new = alpha_Bxbq[..., None] * acc_BxbqxD + _weighted_sum(p_Bxbqxbk, v_BxbkxD)
            return (m_new, l_new, acc_new), None

        init = (
            jnp.full((batch, bq), _MASK_VALUE, jnp.float32),
            jnp.zeros((batch, bq), jnp.float32),
            jnp.zeros((batch, bq, d), jnp.float32),
        )
        (_, l_Bxbq, acc_BxbqxD), _ = jax.lax.scan(
            key_step, init, (k_KxBxbkxC, v_KxBxbkxD, key_valid_Kxbk)
        )
        return (acc_BxbqxD / l_Bxbq[..., None]).astype(out_dtype)

    query_block = jax.checkpoint(
        query_block, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False
    )
    out_QxBxbqxD = jax.lax.map(query_block, q_QxBxbqxC)
    out_BxNxD = out_QxBxbqxD.transpose(1, 0, 2, 3).reshape(batch, nq * bq, d)
    return out_BxNxD[:, :n]


def attention(
    q_BxNxC: jax.Array,
    k_BxMxC: jax.Array,
    v_BxMxD: jax.Array,
    *,
    scale: float,
    impl: str = "blocked",
    block_q: int = 1024,
    block_k: int = 1024,
) -> jax.Array:
    """``softmax_keys(scale * q k^T) @ v`` by ``impl`` (one of ``IMPLS``); ``[B, N, D]``.

    ``block_q``/``block_k`` are used by ``impl='blocked'`` only.
    """
    if impl == "naive":
        return naive_attention(q_BxNxC, k_BxMxC, v_BxMxD, scale=scale)
    if impl == "blocked":
        return blocked_attention(
            q_BxNxC, k_BxMxC, v_BxMxD, scale=scale, block_q=block_q, block_k=block_k
        )
    raise ValueError(f"unknown attention impl {impl!r}; valid values: {', '.join(IMPLS)}")
