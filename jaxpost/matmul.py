"""Projections whose backward pass finds their input already transposed (XLA:CPU layouts).

The weight gradient of `y = x @ W` is `x^T @ dy`, a product over the token dimension N, the
long one. XLA:CPU's matrix multiply wants that dimension minor in one operand, and left to
itself its layout assignment transposes `dy` -- inside the elementwise fusion that produces
it (the SwiGLU or RoPE backward, the sum of the attention's gradients), as strided writes of a
`[N, out]` array, at every projection of every layer. Profiled on bench-tiny's train step,
those fusions took about a quarter of the step.

`project` computes `x @ W` for one or more kernels sharing the input (q/k/v, gate/up) and
saves `x^T` for the backward pass instead of `x`: one transpose per shared input, in the
forward pass, where it is a plain copy; the backward's products then need no transposed
gradient. The residual is as large as `x` (one for the group, as autodiff's would be).

The model uses it when compiling for CPU (`enabled`); elsewhere it keeps `jax.lax.dot_general`,
whose layouts the GPU and TPU compilers choose well.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpost import attention as attention_lib


def enabled() -> bool:
    """Whether the model traced now compiles for CPU (a TPU compiled ahead of time from a CPU
    host is not)."""
    return attention_lib.target_platform() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x_NI, kernels_IO, out_dtype):
    return tuple(jnp.dot(x_NI, w, preferred_element_type=out_dtype) for w in kernels_IO)


def _project_fwd(x_NI, kernels_IO, out_dtype):
    return _project(x_NI, kernels_IO, out_dtype), (x_NI.T, kernels_IO)


def _project_bwd(out_dtype, residuals, dys_NO):
    xT_IN, kernels_IO = residuals
    acc = jnp.promote_types(xT_IN.dtype, jnp.float32)
    pairs = list(zip(dys_NO, kernels_IO, strict=True))
    dx_NI = sum(jnp.dot(dy, w.T, preferred_element_type=acc) for dy, w in pairs)
    dws = tuple(jnp.dot(xT_IN, dy, preferred_element_type=acc).astype(w.dtype) for dy, w in pairs)
    return dx_NI.astype(xT_IN.dtype), dws


_project.defvjp(_project_fwd, _project_bwd)


def project(x_NI: jax.Array, kernels_IO, out_dtype=None) -> tuple[jax.Array, ...]:
    """`tuple(x @ w for w in kernels)` for `x` `[N, I]` and kernels `[I, O_k]`, in `out_dtype`
    (default x's), with the backward pass described in the module doc."""
    return _project(x_NI, tuple(kernels_IO), jnp.dtype(out_dtype or x_NI.dtype))
