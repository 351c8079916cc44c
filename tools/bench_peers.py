"""jaxpost's train step against a plain PyTorch training loop, side by side in one run.

    pip install -e '.[peers]'          # torch and transformers: this tool only
    python tools/bench_peers.py --model bench-tiny --batch 8 --seq 256 [--objectives sft,rm,dpo]

For each objective, the same model (jaxpost's preset; on the PyTorch side `transformers`' Llama
built from the same config, `LlamaForCausalLM` / `LlamaForSequenceClassification`), the same
shapes and synthetic tokens, the same optimizer (AdamW with jaxpost's default hyperparameters,
weight decay on matrices only, gradient clipping at norm 1) and float32 on CPU:

* SFT: masked next-token cross-entropy;
* RM: Bradley-Terry loss on the scores at each sequence's last token (`--batch` pairs);
* DPO: jaxpost with its default precomputed reference log-probs; PyTorch with a live reference
  model (a second forward pass without gradients), as a PyTorch DPO loop runs it.

Each side runs in its own process, one after the other (PyTorch's threads and XLA's never
compete), both with the allocator setting the `jaxpost` command gives itself (glibc malloc on
transparent huge pages; `JAXPOST_MALLOC_TUNING=0` measures without), `--warmup` steps then
`--steps` timed steps; tokens/s counts every row token. Prints
a Markdown table and one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

LR, B1, B2, EPS, WD, CLIP, BETA = 1e-3, 0.9, 0.95, 1e-8, 0.1, 1.0, 0.1


def _tokens(args, pairs: bool):
    import numpy as np

    rng = np.random.default_rng(0)
    from jaxpost import model as model_lib

    vocab = model_lib.preset(args.model).vocab_size
    shape = (args.batch, 2) if pairs else (args.batch,)
    return rng.integers(3, vocab, size=(*shape, args.seq + 1), dtype=np.int32)


def run_jaxpost(args, objective_name: str) -> dict:
    import bench  # tools/bench.py
    import flax.linen as nn
    import jax

    from jaxpost import config as config_lib
    from jaxpost import model as model_lib
    from jaxpost import objectives, optim, sharding
    from jaxpost import step as step_lib

    config = config_lib.base_config()
    config.objective.name = objective_name
    config.objective.logits_chunk_size = args.logits_chunk
    config.optim.update(lr=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, clip_grad_norm=CLIP)
    config.optim.warmup_steps = 0
    model_config = model_lib.preset(args.model, dtype="float32")
    objective = objectives.make_objective(config.objective, model_config)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    tx = optim.make_optimizer(config.optim, 10_000)
    schedule = optim.make_schedule(config.optim, 10_000)
    batch_np = bench.synthetic_batch(
        objective_name, args.batch, args.seq, model_config.vocab_size, 1, targets=args.targets
    )
    tokens = _tokens(args, objective_name != "sft")
    batch_np["inputs"] = tokens[None, ..., :-1]
    batch_np["targets"] = tokens[None, ..., 1:]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, shardings = step_lib.create_state(
            objective.model, tx, mesh, seed=0, seq_len=args.seq
        )
        step = step_lib.make_train_step(
            objective, tx, schedule, state_shardings=shardings, mesh=mesh
        )
        batch = sharding.to_global(batch_np, mesh)
        for _ in range(args.warmup):
            state, m = step(state, batch, None)
        jax.block_until_ready((state, m))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, batch, None)
        jax.block_until_ready((state, m))
        step_s = (time.perf_counter() - t0) / args.steps
    return {"step_s": step_s, "loss": float(m["loss"])}


def run_torch(args, objective_name: str) -> dict:
    import torch
    import transformers

    from jaxpost import hf_mapping
    from jaxpost import model as model_lib

    torch.manual_seed(0)
    model_config = model_lib.preset(args.model, dtype="float32")
    kind = "reward" if objective_name == "rm" else "causal_lm"
    hf = hf_mapping.config_to_hf(model_config, kind)
    hf.update(pad_token_id=0, torch_dtype="float32", attn_implementation="sdpa")
    config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    if objective_name == "rm":
        config.num_labels = 1
        model = transformers.LlamaForSequenceClassification(config)
    else:
        model = transformers.LlamaForCausalLM(config)
    model.train()
    reference = None
    if objective_name == "dpo":
        reference = transformers.LlamaForCausalLM(config)
        reference.load_state_dict(model.state_dict())
        reference.eval().requires_grad_(False)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(B1, B2),
        eps=EPS,
    )
    tokens = torch.from_numpy(_tokens(args, objective_name != "sft")).long()
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    prompt = args.seq - round(args.targets * args.seq)  # positions before it carry no loss
    in_loss = torch.arange(args.seq) >= prompt

    def seq_logps(m, x, y):  # [N, L] -> [N], completion tokens only
        logits = m(input_ids=x).logits.float()
        logps = torch.gather(logits.log_softmax(-1), -1, y[..., None])[..., 0]
        return (logps * in_loss).sum(-1)

    def loss_fn():
        if objective_name == "sft":
            logits = model(input_ids=inputs).logits
            labels = torch.where(in_loss, targets, -100)  # the usual ignore_index masking
            return torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
            )
        x, y = inputs.reshape(-1, args.seq), targets.reshape(-1, args.seq)
        if objective_name == "rm":
            scores = model(input_ids=x).logits[:, 0].float().reshape(-1, 2)
            return -torch.nn.functional.logsigmoid(scores[:, 0] - scores[:, 1]).mean()
        policy = seq_logps(model, x, y).reshape(-1, 2)
        with torch.no_grad():
            ref = seq_logps(reference, x, y).reshape(-1, 2)
        margin = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
        return -torch.nn.functional.logsigmoid(BETA * margin).mean()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    step_s = (time.perf_counter() - t0) / args.steps
    return {"step_s": step_s, "loss": float(loss), "threads": torch.get_num_threads()}


def _worker(args) -> None:
    run = run_jaxpost if args.worker == "jaxpost" else run_torch
    print(json.dumps(run(args, args.objective)))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bench-tiny")
    p.add_argument("--batch", type=int, default=8, help="sequences (SFT) or pairs (RM, DPO)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--objectives", default="sft,rm,dpo")
    p.add_argument(
        "--logits_chunk", type=int, default=0, help="jaxpost objective.logits_chunk_size"
    )
    p.add_argument("--targets", type=float, default=1.0, help="completion fraction of each row")
    p.add_argument("--worker", choices=("jaxpost", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--objective", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return []
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    # Both sides run with the allocator setting the `jaxpost` command gives itself (huge pages
    # for glibc malloc, docs/PERFORMANCE.md); set JAXPOST_MALLOC_TUNING=0 to measure without.
    from jaxpost import main as cli

    env = cli.malloc_env(env, cli._libc()) or env
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    common = [f"--model={args.model}", f"--batch={args.batch}", f"--seq={args.seq}",
              f"--steps={args.steps}", f"--warmup={args.warmup}",
              f"--logits_chunk={args.logits_chunk}", f"--targets={args.targets}"]  # fmt: skip
    rows = []
    for name in args.objectives.split(","):
        result = {"objective": name, "model": args.model, "batch": args.batch, "seq": args.seq}
        for side in ("jaxpost", "torch"):
            out = subprocess.run(
                [sys.executable, __file__, f"--worker={side}", f"--objective={name}", *common],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if out.returncode != 0:
                raise RuntimeError(f"{side} {name} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            sequences = args.batch * (1 if name == "sft" else 2)
            result[f"{side}_tokens_per_s"] = round(sequences * args.seq / r["step_s"], 1)
            result[f"{side}_loss"] = r["loss"]
        result["ratio"] = round(result["jaxpost_tokens_per_s"] / result["torch_tokens_per_s"], 3)
        print(json.dumps(result), flush=True)
        rows.append(result)
    print(f"\n| objective | jaxpost tokens/s | PyTorch loop tokens/s | ratio |  ({args.model}, "
          f"batch {args.batch} x {args.seq})\n|---|---|---|---|")  # fmt: skip
    for r in rows:
        note = " (precomputed ref vs live)" if r["objective"] == "dpo" else ""
        print(f"| {r['objective']}{note} | {r['jaxpost_tokens_per_s']:,.0f} | "
              f"{r['torch_tokens_per_s']:,.0f} | {r['ratio']:.2f}x |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
