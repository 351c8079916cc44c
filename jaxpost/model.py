"""The Llama-family decoder as a pure-functional Flax Linen module.

`Decoder(config).init/apply` -- params are a plain pytree whose leaves map one to one onto a
Hugging Face Llama checkpoint (each tensor a reshape/transpose of one HF tensor):

  embedding            [V, D]            model.embed_tokens.weight
  layers/attn/q/kernel [n, D, H, Dh]     layers.i.self_attn.q_proj.weight ([H*Dh, D])
  layers/attn/k/kernel [n, D, K, Dh]     layers.i.self_attn.k_proj.weight
  layers/attn/v/kernel [n, D, K, Dh]     layers.i.self_attn.v_proj.weight
  layers/attn/o/kernel [n, H, Dh, D]     layers.i.self_attn.o_proj.weight
  layers/attn/{q,k,v}/bias               ..._proj.bias (qkv_bias=True, Qwen2)
  layers/attn/{q,k}_norm/scale [n, Dh]   self_attn.{q,k}_norm.weight (qk_norm=True, Qwen3)
  layers/mlp/{gate,up}/kernel [n, D, F]  layers.i.mlp.{gate,up}_proj.weight
  layers/mlp/down/kernel [n, F, D]       layers.i.mlp.down_proj.weight
  layers/attn_norm/scale, mlp_norm/scale input_layernorm, post_attention_layernorm
  final_norm/scale                       model.norm.weight
  lm_head              [D, V]            lm_head.weight (absent when tie_embeddings)

Layers are stacked on a leading axis and run with `nn.scan`. Rotary embeddings follow
transformers' Llama (`rotate_half` over the two halves of each head).

Shape legend: B batch, L length, D model width, H query heads, K kv heads, G = H/K,
Dh head dim, F mlp width, V vocabulary, n layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpost import attention as attention_lib
from jaxpost import blockwise, matmul

Params = Any  # a plain nested dict of arrays


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of one decoder. Layers receive this and nothing else."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3)
    # RoPE frequency scaling: "" (none), "linear" (positions / factor) or "llama3" (Llama 3.1's
    # wavelength-dependent scaling, with the low/high frequency factors and original context)
    rope_scaling: str = ""
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    sliding_window: int = 0  # >0: each token attends to at most this many (itself included)
    max_position_embeddings: int = 4096  # the context it was trained for (metadata for export)
    # attention kernel for training/eval passes: "xla" (portable: jax.nn.dot_product_attention),
    # "blockwise" (portable: skips the masked upper triangle and recomputes the weights in the
    # backward pass instead of keeping [B, H, L, L] of them; jaxpost/blockwise.py), "cudnn"
    # (NVIDIA GPUs, bf16/fp16: fused flash attention; 2.1x the bench-1b step on an H200),
    # "splash" (TPUs: Pallas flash attention, no [B, H, L, L] scores; jaxpost/attention.py), or
    # "auto" (splash on a TPU, cudnn on a GPU in bf16/fp16 with head_dim <= 128, blockwise on
    # CPU, else xla). Sampling with a KV cache always uses xla.
    attention: str = "auto"
    init_std: float = 0.02
    # activations and matmuls; "auto" becomes bfloat16 on GPUs/TPUs and float32 on CPU when the
    # Config is made (`resolve_dtype`). Logits and rewards accumulate in float32 regardless.
    dtype: str = "float32"
    # the stored params (and so the optimizer's): float32 master weights by default; bfloat16
    # means pure-bf16 training, where updates below a bf16 step of a weight are lost
    param_dtype: str = "float32"
    remat: str = "none"  # one of REMAT_POLICIES

    def __post_init__(self):
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", resolve_dtype("auto"))
        problems = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.mlp_dim <= 0:
            problems.append(f"mlp_dim={self.mlp_dim} must be positive")
        if self.rope_scaling not in ROPE_SCALINGS:
            problems.append(f"rope_scaling={self.rope_scaling!r} is not one of {ROPE_SCALINGS}")
        if self.rope_scaling and self.rope_factor <= 0:
            problems.append(f"rope_factor={self.rope_factor} must be positive")
        if self.attention not in ATTENTION_KERNELS:
            problems.append(f"attention={self.attention!r} is not one of {ATTENTION_KERNELS}")
        if self.sliding_window < 0:
            problems.append(f"sliding_window={self.sliding_window} must be >= 0")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (grouped-query "
                "attention shares each kv head among n_heads/n_kv_heads query heads)"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16", "float64"):
                problems.append(f"{name}={getattr(self, name)!r} is not a float dtype name")
        if problems:
            raise ValueError("Invalid model config (config.model): " + "; ".join(problems))


def resolve_dtype(dtype: str, backend: str | None = None) -> str:
    """A compute dtype name; "auto" is bfloat16 on accelerators (GPU, TPU) and float32 on CPU,
    where bfloat16 matmuls are slow. `backend` defaults to this process's."""
    if dtype != "auto":
        return dtype
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


ROPE_SCALINGS = ("", "linear", "llama3")
ATTENTION_KERNELS = ("auto", "xla", "blockwise", "cudnn", "splash")


def attention_kernel(config: Config) -> str:
    """The kernel `config.attention` selects for the platform being compiled for (the current
    mesh's devices, else the default backend); called when the model is traced."""
    platform = attention_lib.target_platform()
    if config.attention == "splash" and platform != "tpu" and not attention_lib.interpreting():
        raise ValueError(
            f"model.attention='splash' is a TPU kernel, but this compiles for {platform!r}: "
            "set --config.model.attention=auto (or xla); tests can run it on any backend "
            "inside `jaxpost.attention.interpret()`."
        )
    if config.attention != "auto":
        return config.attention
    if platform == "tpu":
        return "splash"
    fast_dtype = config.dtype in ("bfloat16", "float16")
    on_gpu = platform == "gpu"
    if on_gpu and fast_dtype and config.head_dim <= 128:
        return "cudnn"
    return "blockwise" if platform == "cpu" else "xla"


def _kernel(module: nn.Module, cache) -> str:
    """The attention kernel of one pass: xla with a KV cache (sampling) and when initialising
    (only the params' shapes matter, so any backend can init a splash model), else the
    configured one."""
    if cache is not None or module.is_initializing():
        return "xla"
    return attention_kernel(module.config)


REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute each layer in backward
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_BENCH = dict(vocab_size=8192, head_dim=64, rope_theta=10000.0, rms_eps=1e-6, tie_embeddings=False)

PRESETS: dict[str, Config] = {
    # Tiny, for tests: 4 heads / 2 kv heads exercises grouped-query attention.
    "smoke": Config(
        vocab_size=272, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=176
    ),
    # The built-in demo (byte tokenizer vocabulary).
    "demo": Config(
        vocab_size=272, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=352
    ),
    "bench-tiny": Config(d_model=256, mlp_dim=688, n_layers=4, n_heads=4, n_kv_heads=4, **_BENCH),
    "bench-small": Config(d_model=512, mlp_dim=1408, n_layers=8, n_heads=8, n_kv_heads=8, **_BENCH),
    # Llama-3.2-1B's shape (1.24B parameters, tied 128k vocabulary), for accelerator benchmarks.
    "bench-1b": Config(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        rope_theta=500000.0,
        rms_eps=1e-5,
        tie_embeddings=True,
    ),
}


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _init(std: float):
    return nn.initializers.normal(stddev=std)


def _constrain(x, names: tuple[str | None, ...]):
    """Activation sharding hint; a no-op outside a mesh with logical axis rules."""
    return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
    config: Config
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.config
        scale_D = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x_BLD.shape[-1],),
            jnp.dtype(cfg.param_dtype),
        )
        # As transformers' LlamaRMSNorm: normalise in float32, cast back, then scale.
        x = x_BLD.astype(jnp.promote_types(x_BLD.dtype, jnp.float32))
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.rms_eps)
        return (scale_D * x.astype(x_BLD.dtype)).astype(cfg.dtype)


def rope_frequencies(config: Config) -> jax.Array:
    """Inverse frequencies `[Dh/2]` of the rotary embedding, with the configured scaling (as
    transformers' `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`
    and `_compute_llama3_parameters`)."""
    c = config
    inv_freq = 1.0 / (
        c.rope_theta ** (jnp.arange(0, c.head_dim, 2, dtype=logits_dtype(c)) / c.head_dim)
    )
    if c.rope_scaling == "linear":
        return inv_freq / c.rope_factor
    if c.rope_scaling == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between the two
        # thresholds interpolated smoothly.
        low_wavelen = c.rope_original_max_position / c.rope_low_freq_factor
        high_wavelen = c.rope_original_max_position / c.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / c.rope_factor, inv_freq)
        smooth = (c.rope_original_max_position / wavelen - c.rope_low_freq_factor) / (
            c.rope_high_freq_factor - c.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(positions_BL: jax.Array, config: Config) -> tuple[jax.Array, ...]:
    """cos and sin tables `[B, L, Dh]` for transformers-style rotary embeddings."""
    # float32 (float64 for float64 models), as the logits
    angles_BLd = positions_BL.astype(logits_dtype(config))[..., None] * rope_frequencies(config)
    angles_BLD = jnp.concatenate([angles_BLd, angles_BLd], axis=-1)
    return jnp.cos(angles_BLD), jnp.sin(angles_BLD)


def apply_rope(x_BLHD: jax.Array, cos_BLD: jax.Array, sin_BLD: jax.Array) -> jax.Array:
    half = x_BLHD.shape[-1] // 2
    x1, x2 = x_BLHD[..., :half], x_BLHD[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BLD[:, :, None, :], sin_BLD[:, :, None, :]
    dtype = jnp.promote_types(x_BLHD.dtype, jnp.float32)
    out = x_BLHD.astype(dtype) * cos + rotated.astype(dtype) * sin
    return out.astype(x_BLHD.dtype)


def attention_mask(
    segment_ids_BL: jax.Array,
    sliding_window: int = 0,
    branch_ids_BL: jax.Array | None = None,
    positions_BL: jax.Array | None = None,
) -> jax.Array:
    """`[B, 1, L, L]` boolean: causal and within the same segment (packed rows never mix), and
    with `sliding_window > 0` at most that many positions back (the query's own included).

    With `branch_ids_BL`, a segment is a shared part (branch 0) followed by branches 1, 2, ...:
    a token sees the shared part and its own branch, never another branch (shared-prompt
    preference pairs: the rejected completion does not see the chosen one). The sliding window
    then counts `positions_BL` (required with both), since across a skipped branch row offsets
    exceed position offsets."""
    L = segment_ids_BL.shape[-1]
    q_L1, k_1L = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    allowed_LL = k_1L <= q_L1
    if sliding_window > 0 and branch_ids_BL is None:
        allowed_LL &= q_L1 - k_1L < sliding_window
    same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    if branch_ids_BL is not None:
        k_branch_B1L = branch_ids_BL[:, None, :]
        same_BLL &= (k_branch_B1L == 0) | (k_branch_B1L == branch_ids_BL[:, :, None])
        if sliding_window > 0:
            same_BLL &= positions_BL[:, :, None] - positions_BL[:, None, :] < sliding_window
    return (allowed_LL[None] & same_BLL)[:, None]


def cache_mask(positions_BL: jax.Array, num_slots: int, sliding_window: int = 0) -> jax.Array:
    """`[B, 1, L, S]` boolean for attention over a KV cache: slot j is visible to a token at
    position p when j <= p (and p - j < sliding_window, if set)."""
    slots_S = jnp.arange(num_slots)
    pos_BL1 = positions_BL[..., None]
    allowed = slots_S <= pos_BL1
    if sliding_window > 0:
        allowed &= pos_BL1 - slots_S < sliding_window
    return allowed[:, None]


def init_cache(config: Config, batch: int, num_slots: int, dtype=None) -> Params:
    """An empty KV cache `{"k", "v"}: [n_layers, batch, num_slots, K, Dh]` for `Decoder`."""
    shape = (config.n_layers, batch, num_slots, config.n_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def logits_dtype(cfg: Config):
    """Logits and rewards accumulate in float32 (float64 for float64 models)."""
    return jnp.promote_types(jnp.dtype(cfg.dtype), jnp.float32)


def _param(module: nn.Module, name: str, shape, axes, init) -> jax.Array:
    """A logically annotated parameter, cast to the compute dtype."""
    cfg = module.config
    value = module.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype)
    )
    return value.astype(cfg.dtype)


class Dense(nn.Module):
    """Contract the trailing `in_shape` dims of x with a kernel of shape `in_shape + out_shape`."""

    config: Config
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel's dims
    std: float
    use_bias: bool = False

    def setup(self):
        shape = self.in_shape + self.out_shape
        self.kernel = _param(self, "kernel", shape, self.axes, _init(self.std))
        n_in = len(self.in_shape)
        self.bias = None
        if self.use_bias:
            bias_axes = self.axes[n_in:]
            self.bias = _param(self, "bias", self.out_shape, bias_axes, nn.initializers.zeros)

    def __call__(self, x):
        return dense_group(x, (self,))[0]


def dense_group(x, layers: tuple[Dense, ...]) -> list[jax.Array]:
    """`[layer(x) for layer in layers]` for Dense layers of one `in_shape`. Compiling for CPU,
    one `matmul.project` (its backward pass reads x transposed, saved once for the group) when
    x is no larger than the outputs (q/k/v, gate/up, o, the LM head; not down, where XLA's own
    choice, transposing the smaller output gradient, is the cheaper one); elsewhere
    `dot_general` each."""
    n_in = len(layers[0].in_shape)
    lead = x.shape[: x.ndim - n_in]
    size = math.prod(layers[0].in_shape)
    out_size = sum(math.prod(layer.out_shape) for layer in layers)
    if matmul.enabled() and size <= out_size:
        kernels = [layer.kernel.reshape(size, -1) for layer in layers]
        ys = matmul.project(x.reshape(-1, size), kernels)
        ys = [y.reshape(lead + layer.out_shape) for y, layer in zip(ys, layers, strict=True)]
    else:
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        ys = [jax.lax.dot_general(x, layer.kernel, (contract, ((), ()))) for layer in layers]
    pairs = zip(ys, layers, strict=True)
    return [y if layer.bias is None else y + layer.bias for y, layer in pairs]


class Attention(nn.Module):
    config: Config

    @nn.compact
    def __call__(
        self, x_BLD, cos_BLD, sin_BLD, mask_B1LS, positions_BL=None, cache=None, segment_ids_BL=None
    ):
        """With `cache` ({"k", "v"}: `[B, S, K, Dh]`), the new keys and values are written at
        slots `positions_BL` and attention reads the whole cache (mask `[B, 1, L, S]`); returns
        `(out, new_cache)`. Without: `(out, None)`. The splash kernel takes `segment_ids_BL`
        instead of a mask (`mask_B1LS` is then None)."""
        cfg = self.config
        D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

        def proj(name, heads, head_axis):
            axes = ("embed", head_axis, "head_dim")
            return Dense(cfg, (D,), (heads, Dh), axes, cfg.init_std, cfg.qkv_bias, name=name)

        projections = (proj("q", H, "heads"), proj("k", K, "kv_heads"), proj("v", K, "kv_heads"))
        q_BLHD, k_BLKD, v_BLKD = dense_group(x_BLD, projections)
        q_BLHD = _constrain(q_BLHD, ("act_batch", "act_length", "act_heads", None))
        if cfg.qk_norm:
            q_BLHD = RMSNorm(cfg, "head_dim", name="q_norm")(q_BLHD)
            k_BLKD = RMSNorm(cfg, "head_dim", name="k_norm")(k_BLKD)
        q_BLHD = apply_rope(q_BLHD, cos_BLD, sin_BLD)
        k_BLKD = apply_rope(k_BLKD, cos_BLD, sin_BLD)
        new_cache = None
        if cache is not None:
            rows_B1 = jnp.arange(x_BLD.shape[0])[:, None]
            k_BSKD = cache["k"].at[rows_B1, positions_BL].set(k_BLKD.astype(cache["k"].dtype))
            v_BSKD = cache["v"].at[rows_B1, positions_BL].set(v_BLKD.astype(cache["v"].dtype))
            new_cache = {"k": k_BSKD, "v": v_BSKD}
            k_BLKD, v_BLKD = k_BSKD.astype(cfg.dtype), v_BSKD.astype(cfg.dtype)
        # Grouped-query attention: dot_product_attention shares each kv head among H/K queries.
        kernel = _kernel(self, cache)
        if kernel == "splash":
            out_BLHD = attention_lib.splash_attention(
                q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, sliding_window=cfg.sliding_window
            )
        elif kernel == "cudnn":
            # The mask still carries segments (packing); is_causal lets the kernel skip the
            # upper triangle.
            out_BLHD = jax.nn.dot_product_attention(
                q_BLHD, k_BLKD, v_BLKD, mask=mask_B1LS, is_causal=True, implementation="cudnn"
            )
        elif kernel == "blockwise":
            out_BLHD = blockwise.attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LS)
        else:
            out_BLHD = jax.nn.dot_product_attention(q_BLHD, k_BLKD, v_BLKD, mask=mask_B1LS)
        out_BLHD = _constrain(out_BLHD, ("act_batch", "act_length", "act_heads", None))
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        o_axes = ("heads", "head_dim", "embed")
        return Dense(cfg, (H, Dh), (D,), o_axes, out_std, name="o")(out_BLHD), new_cache


class Mlp(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.config
        D, F = cfg.d_model, cfg.mlp_dim
        gate = Dense(cfg, (D,), (F,), ("embed", "mlp"), cfg.init_std, name="gate")
        up = Dense(cfg, (D,), (F,), ("embed", "mlp"), cfg.init_std, name="up")
        gate_BLF, up_BLF = dense_group(x_BLD, (gate, up))
        h_BLF = _constrain(nn.silu(gate_BLF) * up_BLF, ("act_batch", "act_length", "act_mlp"))
        down_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        return Dense(cfg, (F,), (D,), ("mlp", "embed"), down_std, name="down")(h_BLF)


class Block(nn.Module):
    """Pre-norm transformer block; the scan body (carry = residual stream)."""

    config: Config

    @nn.compact
    def __call__(self, x_BLD, cos_BLD, sin_BLD, mask_B1LS, segment_ids_BL, positions_BL, cache):
        cfg = self.config
        h_BLD = RMSNorm(cfg, name="attn_norm")(x_BLD)
        attn_BLD, cache = Attention(cfg, name="attn")(
            h_BLD, cos_BLD, sin_BLD, mask_B1LS, positions_BL, cache, segment_ids_BL
        )
        x_BLD = x_BLD + attn_BLD
        h_BLD = RMSNorm(cfg, name="mlp_norm")(x_BLD)
        x_BLD = x_BLD + Mlp(cfg, name="mlp")(h_BLD)
        x_BLD = _constrain(x_BLD, ("act_batch", "act_length", "act_embed"))
        return x_BLD, cache


class Decoder(nn.Module):
    """Token ids in, logits (or final hidden states) out."""

    config: Config

    @nn.compact
    def __call__(
        self,
        tokens_BL: jax.Array,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        *,
        return_hidden: bool = False,
        cache: Params | None = None,
        branch_ids_BL: jax.Array | None = None,
    ) -> jax.Array:
        """Forward pass.

        Args:
          tokens_BL: input token ids.
          positions_BL: position of each token within its segment (RoPE); default `arange(L)`.
          segment_ids_BL: document id of each token; attention stays within equal ids, so a
            packed row never attends across documents. Default: one segment per row.
          return_hidden: return the final-norm hidden states `[B, L, D]` instead of logits, for
            chunked log-probs (`losses.chunked_token_logps` with `unembedding(params, cfg)`).
          cache: for sampling (`init_cache`): keys and values of earlier tokens per layer,
            `{"k", "v"}: [n, B, S, K, Dh]`. The new tokens' keys and values are written at slots
            `positions_BL`, each token attends to the slots up to its position, and the result
            is `(logits, new_cache)`. Segment ids are not used with a cache.
          branch_ids_BL: branches within a segment (see `attention_mask`), for shared-prompt
            pairs; the splash kernel cannot mask them.
        """
        cfg = self.config
        B, L = tokens_BL.shape
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), jnp.int32)

        embedding_VD = self.param(
            "embedding",
            nn.with_logical_partitioning(_init(cfg.init_std), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
            jnp.dtype(cfg.param_dtype),
        )
        x_BLD = jnp.take(embedding_VD, tokens_BL, axis=0).astype(cfg.dtype)
        x_BLD = _constrain(x_BLD, ("act_batch", "act_length", "act_embed"))
        cos_BLD, sin_BLD = rope_tables(positions_BL, cfg)
        kernel, layer_cfg = _kernel(self, cache), cfg
        if branch_ids_BL is not None and kernel == "splash":
            if cfg.attention != "auto":
                raise ValueError(
                    "shared-prompt pairs (branch ids) need an attention mask the splash kernel "
                    "cannot express: set --config.model.attention=blockwise (what auto picks "
                    "for them on TPUs), or --config.objective.shared_prompt=false"
                )
            kernel = "blockwise"  # auto: a kernel that takes the branch mask
            layer_cfg = dataclasses.replace(cfg, attention=kernel)
        if kernel == "splash":
            mask_B1LS = None  # the kernel masks from the segment ids, block by block
        elif cache is None:
            mask_B1LS = attention_mask(
                segment_ids_BL, cfg.sliding_window, branch_ids_BL, positions_BL
            )
        else:
            mask_B1LS = cache_mask(positions_BL, cache["k"].shape[2], cfg.sliding_window)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 5 + (0,),
            length=cfg.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(layer_cfg, name="layers")
        x_BLD, new_cache = layers(
            x_BLD, cos_BLD, sin_BLD, mask_B1LS, segment_ids_BL, positions_BL, cache
        )
        x_BLD = RMSNorm(cfg, name="final_norm")(x_BLD)
        if return_hidden:
            return x_BLD if cache is None else (x_BLD, new_cache)

        if cfg.tie_embeddings:
            unembed_DV = embedding_VD.T
        else:
            unembed_DV = self.param(
                "lm_head",
                nn.with_logical_partitioning(_init(cfg.init_std), ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size),
                jnp.dtype(cfg.param_dtype),
            )
        # float32 logits whatever the compute dtype (the matmul accumulates in float32): bf16
        # logits would round every log-prob before the log-softmax.
        if matmul.enabled():
            (logits_ND,) = matmul.project(
                x_BLD.reshape(-1, cfg.d_model), [unembed_DV.astype(cfg.dtype)], logits_dtype(cfg)
            )
            logits_BLV = logits_ND.reshape(B, L, cfg.vocab_size)
        else:
            logits_BLV = jnp.einsum(
                "bld,dv->blv",
                x_BLD,
                unembed_DV.astype(cfg.dtype),
                preferred_element_type=logits_dtype(cfg),
            )
        logits_BLV = _constrain(logits_BLV, ("act_batch", "act_length", "act_vocab"))
        return logits_BLV if cache is None else (logits_BLV, new_cache)


@functools.partial(jax.jit, static_argnums=0)
def forward_logits(
    config: Config,
    params: Params,
    tokens_BL: jax.Array,
    positions_BL: jax.Array | None = None,
    segment_ids_BL: jax.Array | None = None,
) -> jax.Array:
    """Float32 logits `[B, L, V]` of `Decoder(config)` with `params` (the plain pytree)."""
    logits_BLV = Decoder(config).apply({"params": params}, tokens_BL, positions_BL, segment_ids_BL)
    return logits_BLV.astype(jnp.float32)


def init_params(config: Config, seed: int = 0) -> Params:
    """Freshly initialised `Decoder(config)` params as a plain pytree (no sharding)."""
    tokens = jnp.ones((1, 2), jnp.int32)
    return nn.meta.unbox(Decoder(config).init(jax.random.PRNGKey(seed), tokens)["params"])


def unembedding(params: Params, config: Config) -> jax.Array:
    """The output projection `[D, V]` of a params pytree (the transposed embedding if tied)."""
    return params["embedding"].T if config.tie_embeddings else params["lm_head"]


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def flops_per_token(config: Config, seq_len: int, *, lm_head: bool = True) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention.

    6 x (matmul parameters, including the output projection but not the embedding lookup) plus
    12 x n_layers x (H x Dh) x seq_len for attention scores and values (no causal discount).
    Remat recomputation is not counted (MFU, not hardware utilisation). `lm_head=False` counts a
    scalar head instead of the vocabulary projection (reward models).
    """
    c = config
    attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    mlp = 3 * c.d_model * c.mlp_dim
    matmul_params = c.n_layers * (attn + mlp) + (c.d_model * c.vocab_size if lm_head else c.d_model)
    return 6.0 * matmul_params + 12.0 * c.n_layers * c.n_heads * c.head_dim * seq_len


class RewardModel(nn.Module):
    """The decoder backbone plus a scalar head: one reward per token `[B, L]`.

    Params: `{"decoder": <Decoder params without lm_head>, "score": [D]}`; the reward of a
    sequence is read at its last real token (see `last_token_values`). `score` maps onto
    transformers' `LlamaForSequenceClassification.score.weight` (`[1, D]`).
    """

    config: Config

    @nn.compact
    def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, branch_ids_BL=None):
        cfg = self.config
        hidden_BLD = Decoder(cfg, name="decoder")(
            tokens_BL, positions_BL, segment_ids_BL, return_hidden=True, branch_ids_BL=branch_ids_BL
        )
        score_D = _param(self, "score", (cfg.d_model,), ("embed",), _init(cfg.init_std))
        return jnp.einsum(
            "bld,d->bl", hidden_BLD, score_D, preferred_element_type=logits_dtype(cfg)
        ).astype(logits_dtype(cfg))


def last_token_values(values_BL: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
    """`values[b, t_b]` where `t_b` is the last non-padding position of row b (0 if none)."""
    real_BL = segment_ids_BL > 0
    L = real_BL.shape[-1]
    last_B = jnp.maximum(L - 1 - jnp.argmax(real_BL[:, ::-1], axis=-1), 0)
    last_B = jnp.where(real_BL.any(-1), last_B, 0)
    return jnp.take_along_axis(values_BL, last_B[:, None], axis=-1)[:, 0]
