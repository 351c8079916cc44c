"""Train-step throughput benchmark on synthetic tokens (no data pipeline).

  python tools/bench.py --objective sft --model bench-tiny --batch 16 --seq 256 [--steps 10]

--objective rm|dpo runs pairs (`--batch` pairs of two sequences; DPO with precomputed reference
log-probs, its default). `--shared` runs the same pairs with each prompt encoded once
(`objective.shared_prompt`): one row of prompt + chosen + rejected per pair; `--targets` sets
the completion's share of each sequence (0.5: prompt:completion 1:1, 0.25: 3:1).

Prints one JSON line: step time, tokens/s (per chip and total; the data's tokens, a pair's
prompt counted twice, so shared and unshared rows compare), pairs/s, MFU against the peak that
`jaxpost.metrics.peak_flops` reports (data-sheet bf16 peak on TPU/GPU; measured float32 matmul
on CPU; the FLOPs of the tokens that run), and peak device memory where the backend reports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import flax.linen as nn
import jax
import numpy as np

from jaxpost import config as config_lib
from jaxpost import metrics, objectives, optim, sharding
from jaxpost import model as model_lib
from jaxpost import step as step_lib
from jaxpost.data import pipeline


def synthetic_batch(
    objective_name: str, batch: int, seq: int, vocab: int, accum: int, seed=0, targets=1.0
):
    """Random tokens in the objective's batch layout: `[A, B, L]` (SFT) or `[A, B, 2, L]` pairs
    (RM, DPO; with precomputed reference log-probs for DPO, as its default config uses). The
    last `targets` fraction of each row carries the loss (the rest is a prompt)."""
    rng = np.random.default_rng(seed)
    shape = (accum, batch // accum) + ((2,) if objective_name in ("rm", "dpo") else ())
    tokens = rng.integers(3, vocab, size=(*shape, seq + 1), dtype=np.int32)
    ones = np.ones((*shape, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), ones.shape).copy()
    loss_mask = (positions >= seq - round(targets * seq)).astype(np.int32)
    out = {
        "inputs": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "loss_mask": loss_mask,
        "segment_ids": ones,
        "positions": positions,
    }
    if objective_name == "dpo":
        out["ref_logps"] = rng.normal(-seq * 5.0, 1.0, size=(*shape[:2], 1, 2)).astype(np.float32)
    return out


def synthetic_shared_batch(
    objective_name: str, batch: int, seq: int, vocab: int, accum: int, seed=0, targets=1.0
):
    """The pairs of `synthetic_batch` (each side `seq` tokens, its last `targets` fraction a
    completion after a prompt both sides share) as shared-prompt rows `[A, B, L]`, one pair
    per row, `L` what the pair needs (`pipeline.shared_features`), padded to a multiple of 8."""
    rng = np.random.default_rng(seed)
    shift = objective_name != "rm"
    n = seq + 1 if shift else seq
    completion = round(targets * seq)
    rows = []
    for _ in range(batch):
        prompt = rng.integers(3, vocab, n - completion, dtype=np.int32)
        mask = np.r_[np.zeros(n - completion), np.ones(completion)].astype(np.int32)
        sides = [
            pipeline.Example(
                np.r_[prompt, rng.integers(3, vocab, completion, dtype=np.int32)], mask
            )
            for _ in range(2)
        ]
        rows.append(pipeline.shared_features(pipeline.PairExample(*sides), shift))
    length = -(-max(len(r["inputs"]) for r in rows) // 8) * 8
    out = {k: np.zeros((batch, length), np.int32) for k in (*rows[0], "segment_ids")}
    for b, r in enumerate(rows):
        for k, v in r.items():
            out[k][b, : len(v)] = v
        out["segment_ids"][b, : len(r["inputs"])] = 1
    if objective_name == "dpo":
        out["ref_logps"] = rng.normal(-seq * 5.0, 1.0, size=(batch, 1, 2)).astype(np.float32)
    return {k: v.reshape(accum, batch // accum, *v.shape[1:]) for k, v in out.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="sft", choices=["sft", "rm", "dpo"])
    parser.add_argument(
        "--logits_chunk",
        type=int,
        default=0,
        help="objective.logits_chunk_size (0 = full [B, L, V] logits)",
    )
    parser.add_argument("--model", default="bench-tiny", choices=sorted(model_lib.PRESETS))
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", help="activation dtype (bfloat16 on TPU/GPU)")
    parser.add_argument("--remat", default="none", choices=sorted(model_lib.REMAT_POLICIES))
    parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor")
    parser.add_argument("--attention", default="auto", choices=list(model_lib.ATTENTION_KERNELS))
    parser.add_argument(
        "--targets", type=float, default=1.0, help="fraction of each row that carries the loss"
    )
    parser.add_argument(
        "--shared", action="store_true", help="rm/dpo: shared-prompt rows (objective.shared_prompt)"
    )
    args = parser.parse_args()
    if args.shared and args.objective == "sft":
        parser.error("--shared is for pairs (rm, dpo)")

    config = config_lib.base_config()
    config.objective.name = args.objective
    config.objective.logits_chunk_size = args.logits_chunk
    config.objective.shared_prompt = args.shared
    model_config = model_lib.preset(
        args.model, dtype=args.dtype, remat=args.remat, attention=args.attention
    )
    config.model = dataclasses.asdict(model_config)
    mesh = sharding.make_mesh(dict(zip(sharding.AXES, map(int, args.mesh.split(",")), strict=True)))
    objective = objectives.make_objective(config.objective, model_config)
    model = objective.model
    tx = optim.make_optimizer(config.optim, 1000)
    schedule = optim.make_schedule(config.optim, 1000)
    batch_np = (synthetic_shared_batch if args.shared else synthetic_batch)(
        args.objective, args.batch, args.seq, model_config.vocab_size, args.accum,
        targets=args.targets,
    )  # fmt: skip
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, shardings = step_lib.create_state(model, tx, mesh, seed=0, seq_len=args.seq)
        step = step_lib.make_train_step(
            objective, tx, schedule, state_shardings=shardings, mesh=mesh
        )
        batch = sharding.to_global(batch_np, mesh)
        t0 = time.perf_counter()
        state, m = step(state, batch, None)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        state, m = step(state, batch, None)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, batch, None)
        jax.block_until_ready((state, m))
        step_s = (time.perf_counter() - t0) / args.steps
    peak, peak_source = metrics.peak_flops()
    pairs = args.objective in ("rm", "dpo")
    # tokens of the data (both sides of a pair, prompts twice), so that shared rows compare
    sequences = args.batch * (2 if pairs else 1)
    tokens = sequences * args.seq
    run_len = batch_np["inputs"].shape[-1]  # the tokens that run: one row per sequence or pair
    run_tokens = batch_np["inputs"].size
    flops = model_lib.flops_per_token(model_config, run_len, lm_head=args.objective != "rm")
    flops *= run_tokens
    mem = jax.devices()[0].memory_stats() or {}
    print(
        json.dumps(
            {
                "objective": args.objective,
                "model": args.model,
                "batch": args.batch,
                "seq": args.seq,
                "dtype": args.dtype,
                "remat": args.remat,
                "logits_chunk": args.logits_chunk,
                "targets": args.targets,
                "shared": args.shared,
                "row_len": run_len,
                "attention": model_lib.attention_kernel(model_config),
                "mesh": dict(mesh.shape),
                "device": jax.devices()[0].device_kind,
                "n_devices": jax.device_count(),
                "params": model_lib.count_params(state.params),
                "compile_s": round(compile_s, 2),
                "step_s": round(step_s, 4),
                "tokens_per_s": round(tokens / step_s, 1),
                **({"pairs_per_s": round(args.batch / step_s, 2)} if pairs else {}),
                "tokens_per_s_per_chip": round(tokens / step_s / jax.device_count(), 1),
                "mfu": round(flops / step_s / peak, 4),
                "peak_flops": peak,
                "peak_source": peak_source,
                "peak_bytes_in_use": mem.get("peak_bytes_in_use"),
                "loss": float(m["loss"]),
            }
        )
    )


if __name__ == "__main__":
    main()
