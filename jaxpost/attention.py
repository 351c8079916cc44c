"""Pallas splash attention (TPU flash attention) for training and eval forward passes.

`splash_attention` computes what `jax.nn.dot_product_attention` computes with the decoder's
mask -- causal, within equal segment ids (packed rows), optionally a sliding window, grouped-query
heads -- without materialising `[B, H, L, L]` scores. The kernel runs per device, so it is wrapped
in `jax.shard_map` over the current mesh: batch split over `data` x `fsdp`, heads over `tensor`.

Off TPUs the kernel runs only in Pallas interpret mode (`interpret()`, for tests): slow, but the
same kernel code, so its values and gradients can be checked on CPU.

Shape legend: B batch, L length, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from jaxpost import sharding

# Lengths are padded to a multiple of LANES (the TPU vector width the kernel's kv blocks need);
# blocks are the largest of BLOCKS that divides the padded length.
LANES = 128
BLOCKS = (512, 256, 128)

_interpret = False


@contextlib.contextmanager
def interpret() -> Iterator[None]:
    """Run splash attention in Pallas interpret mode (any backend; for tests). Read when a
    function is traced: a jitted function traced inside keeps interpret mode."""
    global _interpret
    previous, _interpret = _interpret, True
    try:
        yield
    finally:
        _interpret = previous


def interpreting() -> bool:
    return _interpret


def target_platform() -> str:
    """The platform being compiled for: the current mesh's devices' (a TPU slice compiled
    ahead of time on a CPU host is "tpu"), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def block_size(length: int) -> int:
    """The kernel's q/kv block for a sequence padded to `length` (a multiple of LANES)."""
    return next(b for b in BLOCKS if length % b == 0)


def padded_length(length: int) -> int:
    return -(-length // LANES) * LANES


def _kernel(heads: int, length: int, sliding_window: int, interpret_mode: bool):
    """A splash kernel over `heads` query heads of `length` tokens. Built where it is traced:
    it holds its block masks as arrays of the current trace."""
    shape = (length, length)
    if sliding_window > 0:
        # Keys q - (window - 1) .. q: causal and at most `sliding_window` back, itself included.
        head_mask = splash_mask.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    else:
        head_mask = splash_mask.CausalMask(shape)
    b = block_size(length)
    blocks = splash.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    return splash.make_splash_mha(
        splash_mask.MultiHeadMask([head_mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret_mode,
    )


def _local_attention(q_BHLD, k_BKLD, v_BKLD, segment_ids_BL, *, sliding_window, interpret_mode):
    """Splash attention over this device's rows and heads; L is a multiple of LANES."""
    kernel = _kernel(q_BHLD.shape[1], q_BHLD.shape[2], sliding_window, interpret_mode)

    def one_row(q_HLD, k_KLD, v_KLD, segment_ids_L):
        segments = splash.SegmentIds(q=segment_ids_L, kv=segment_ids_L)
        return kernel(q_HLD, k_KLD, v_KLD, segment_ids=segments)

    return jax.vmap(one_row)(q_BHLD, k_BKLD, v_BKLD, segment_ids_BL)


def _divides(mesh, names: tuple[str, ...], size: int) -> tuple[str, ...] | None:
    """The mesh axes among `names` (of size > 1) if together they divide `size`, else None
    (the dimension is then replicated)."""
    names = tuple(n for n in names if n in mesh.axis_names and mesh.shape[n] > 1)
    if not names or size % math.prod(mesh.shape[n] for n in names):
        return None
    return names


def splash_attention(
    q_BLHD: jax.Array,
    k_BLKD: jax.Array,
    v_BLKD: jax.Array,
    segment_ids_BL: jax.Array,
    *,
    sliding_window: int = 0,
) -> jax.Array:
    """Causal attention within equal segment ids (and `sliding_window` if > 0), scaled by
    1/sqrt(Dh) as `jax.nn.dot_product_attention`; K may divide H (grouped-query). Returns
    `[B, L, H, Dh]` in q's dtype."""
    B, L, H, Dh = q_BLHD.shape
    K = k_BLKD.shape[2]
    padded = padded_length(L)
    scale = 1.0 / math.sqrt(Dh)
    q_BHLD = (q_BLHD.astype(jnp.float32) * scale).astype(q_BLHD.dtype).transpose(0, 2, 1, 3)
    k_BKLD, v_BKLD = k_BLKD.transpose(0, 2, 1, 3), v_BLKD.transpose(0, 2, 1, 3)
    segment_ids_BL = segment_ids_BL.astype(jnp.int32)  # the kernel compares int32 ids
    if padded != L:
        # Padded keys come after every real query, so the causal mask hides them; padded
        # queries see at least themselves (no empty softmax) and are dropped below.
        widths = ((0, 0), (0, 0), (0, padded - L), (0, 0))
        q_BHLD, k_BKLD, v_BKLD = (jnp.pad(x, widths) for x in (q_BHLD, k_BKLD, v_BKLD))
        segment_ids_BL = jnp.pad(segment_ids_BL, ((0, 0), (0, padded - L)))
    attend = functools.partial(
        _local_attention, sliding_window=sliding_window, interpret_mode=_interpret
    )

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        batch = _divides(mesh, sharding.BATCH_AXES, B)
        heads = _divides(mesh, ("tensor",), H)
        kv_heads = _divides(mesh, ("tensor",), K) if heads else None
        if heads and not kv_heads:
            # Fewer kv heads than tensor shards: give every query head its own copy.
            k_BKLD, v_BKLD = (jnp.repeat(x, H // K, axis=1) for x in (k_BKLD, v_BKLD))
            kv_heads = heads
        q_spec, kv_spec = P(batch, heads, None, None), P(batch, kv_heads, None, None)
        attend = jax.shard_map(
            attend,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)),
            out_specs=q_spec,
            check_vma=False,
        )
    out_BHLD = attend(q_BHLD, k_BKLD, v_BKLD, segment_ids_BL)
    return out_BHLD[:, :, :L].transpose(0, 2, 1, 3)
