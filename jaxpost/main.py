"""The `jaxpost` command line: `jaxpost train --config=configs/sft.py:smoke --workdir=DIR`.

Field overrides follow the config: `--config.optim.lr=3e-4 --config.train.num_steps=200`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

_USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def malloc_env(
    environ: Mapping[str, str], libc: tuple[str, str], system: str = sys.platform
) -> dict[str, str] | None:
    """The environment to re-execute the CLI with so that glibc backs large allocations with
    transparent huge pages, or None when that is set already, this process is the re-executed
    one (`_JAXPOST_REEXEC`: at most one re-exec, even where glibc drops the variable, as it does
    for setuid or capability binaries), opted out of (`JAXPOST_MALLOC_TUNING=0`) or not glibc
    >= 2.35 on Linux.

    Why: XLA:CPU allocates a step's temporary buffers afresh at every execution, and glibc serves
    large ones with new mmaps whose 4 KiB pages fault on first touch, every step (175k faults a
    step for bench-tiny's train step on 2 cores, ~20% of it). glibc reads the tunable only at
    process start, hence the re-exec. Harmless on GPU/TPU hosts (their host memory only)."""
    if system != "linux" or environ.get("JAXPOST_MALLOC_TUNING", "1") == "0":
        return None
    if "_JAXPOST_REEXEC" in environ:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    name, version = libc
    if "glibc.malloc.hugetlb" in tunables or name != "glibc":
        return None
    try:
        if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:
        return None
    tunables = ":".join(t for t in (tunables, MALLOC_TUNABLE) if t)
    return {**environ, "GLIBC_TUNABLES": tunables, "_JAXPOST_REEXEC": "1"}


def _libc() -> tuple[str, str]:
    """`("glibc", "2.36")` on glibc; ("", "") where unknown (cheap: no binary scan)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return "", ""
    return name, version


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpost", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train (or resume) one run",
        epilog="Any --config.SECTION.KEY=VALUE overrides that config field.",
    )
    train.add_argument("--config", required=True, help="path/to/config.py[:variant]")
    train.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
    train.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host; auto-detected on Cloud TPU "
        "and SLURM, or set --coordinator/--num_processes/--process_id)",
    )
    train.add_argument("--coordinator", default=None, help="host:port of process 0")
    train.add_argument("--num_processes", type=int, default=None)
    train.add_argument("--process_id", type=int, default=None)
    train.add_argument(
        "--init_timeout", type=int, default=300, help="seconds to wait for every process to join"
    )
    plan = sub.add_parser(
        "plan",
        help="memory per device of a config's train step, compiled (locally or for a TPU slice)",
        epilog="Any --config.SECTION.KEY=VALUE overrides that config field. No data is read.",
    )
    plan.add_argument("--config", required=True, help="path/to/config.py[:variant]")
    plan.add_argument(
        "--topology",
        default=None,
        help="a TPU slice to compile for on this machine, e.g. v5p-64, v5e-16, v6e-8 or "
        "v5p:4x4x4 (needs libtpu: pip install 'jaxpost[tpu-aot]'); default: the local devices",
    )
    plan.add_argument(
        "--no_suggest",
        action="store_true",
        help="when it does not fit, do not recompile with changes that might make it fit",
    )
    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="validate and tokenise records once into a token-level dataset (ArrayRecord shards "
        "+ manifest) that training opens in time independent of its size",
        epilog="The tokenizer and chat-template settings come from --config (and its "
        "--config.data.* overrides), so training with that config accepts the result.",
    )
    prep.add_argument("--config", required=True, help="the training config (its data section)")
    prep.add_argument(
        "--input",
        action="append",
        default=[],
        help="JSONL/Parquet/... file or glob, as in data.train_path (repeatable; default: the "
        "config's data.train_path)",
    )
    prep.add_argument("--out", required=True, help="directory to create")
    prep.add_argument(
        "--eval_fraction", type=float, default=0.0, help="hold out this random fraction as 'eval'"
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of the eval hold-out")
    prep.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    prep.add_argument(
        "--skip_invalid", action="store_true", help="skip and count invalid records (by reason)"
    )
    prep.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export = sub.add_parser("export", help="a run's checkpoint -> a Hugging Face directory")
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True, help="directory to create")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    export.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as trained)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: run on every host, as `train --distributed` (process 0 writes)",
    )
    export.add_argument("--coordinator", default=None, help="host:port of process 0")
    export.add_argument("--num_processes", type=int, default=None)
    export.add_argument("--process_id", type=int, default=None)
    export.add_argument("--init_timeout", type=int, default=300)
    samp = sub.add_parser("sample", help="generate replies from a run or a Hugging Face model")
    src = samp.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a jaxpost run (its latest checkpoint, or --step)")
    src.add_argument("--hf_dir", help="a Hugging Face model directory")
    samp.add_argument("--step", type=int, default=None)
    samp.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    samp.add_argument("--prompts_file", help="a text file, one prompt per line")
    samp.add_argument("--raw", action="store_true", help="plain text prompts, no chat template")
    samp.add_argument("--max_new_tokens", type=int, default=128)
    samp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    samp.add_argument("--top_k", type=int, default=0)
    samp.add_argument("--top_p", type=float, default=1.0)
    samp.add_argument("--seed", type=int, default=0)
    conv = sub.add_parser("convert", help="a GGUF (llama.cpp) file -> a Hugging Face directory")
    conv.add_argument("--gguf", required=True, help="a Llama-architecture .gguf file")
    conv.add_argument("--out", required=True, help="directory to create")
    conv.add_argument("--overwrite", action="store_true")
    sw = sub.add_parser(
        "sweep",
        help="run a config file's get_sweep(arg) points (resumable) and compare them",
        epilog="Any --config.SECTION.KEY=VALUE applies to every point.",
    )
    sw.add_argument("--config", required=True, help="path/to/config.py[:arg] with get_sweep(arg)")
    sw.add_argument("--root", required=True, help="parent directory of the points' workdirs")
    sw.add_argument("--dry_run", action="store_true", help="print each point's command only")
    sw.add_argument(
        "--launch",
        default="",
        help="run each point as a job: this command prefix ({name}, {workdir} filled in), "
        "then the point's train arguments",
    )
    sw.add_argument("--metric", default="eval/loss", help="the metric that names the best point")
    sw.add_argument("--mode", default="min", choices=("min", "max"))
    demo = sub.add_parser("demo", help="the built-in SFT -> RM -> DPO demo")
    demo.add_argument("--workdir", default="runs/demo", help="where the three runs go")
    return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config.") :])
        else:
            rest.append(arg)
    return rest, overrides


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse `argv` and run; returns the command's summary (used by tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    # Imports after parsing, so `jaxpost --help` is instant.
    if args.command == "data":
        return _prepare(args, overrides)
    if args.command in ("export", "sample", "convert") and overrides:
        raise ValueError(f"jaxpost {args.command} takes no --config overrides")
    if args.command == "convert":
        from jaxpost import convert

        out = convert.convert(args.gguf, args.out, overwrite=args.overwrite)
        print(f"converted {args.gguf} to {out}")
        return {"out": out}
    if args.command == "export":
        from jaxpost import serve

        if args.distributed:
            _init_distributed(args, quiet_others=False)
        out = serve.export(
            args.workdir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite
        )
        print(f"exported {args.workdir} to {out}")
        return {"out": out}
    if args.command == "sample":
        from jaxpost import serve

        prompts = list(args.prompt)
        if args.prompts_file:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError("give --prompt TEXT (repeatable) or --prompts_file FILE")
        replies = serve.sample(
            prompts,
            workdir=args.workdir,
            hf_dir=args.hf_dir,
            step=args.step,
            chat=not args.raw,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        for prompt, reply in zip(prompts, replies, strict=True):
            print(f">>> {prompt}\n{reply}\n")
        return {"replies": replies}
    if args.command == "sweep":
        from jaxpost import sweep

        return sweep.sweep(
            args.config,
            args.root,
            fixed=overrides,
            dry_run=args.dry_run,
            launch=args.launch,
            metric=args.metric,
            mode=args.mode,
        )
    if args.command == "demo":
        if overrides:
            raise ValueError("jaxpost demo takes no --config overrides")
        from jaxpost import demo

        return demo.run(args.workdir)
    from jaxpost import config as config_lib

    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    if args.command == "plan":
        from jaxpost import memory

        return memory.plan(config, args.topology, try_changes=not args.no_suggest)
    from jaxpost import train as train_lib

    if args.distributed:
        _init_distributed(args)
    summary = train_lib.train(config, args.workdir)
    before, after = summary["eval_before"], summary["eval_after"]
    if after:
        logging.getLogger("jaxpost").info(
            "done: %s", _before_after(before, after, summary["start_step"], summary["final_step"])
        )
    return summary


def _init_distributed(args, *, quiet_others: bool = True) -> None:
    """`jax.distributed.initialize` from the command's --coordinator/--num_processes/
    --process_id/--init_timeout (auto-detected on Cloud TPU and SLURM when not given);
    `quiet_others` leaves the info log to process 0."""
    import jax

    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=args.init_timeout,
    )
    if quiet_others and jax.process_index() != 0:  # one voice; errors still print everywhere
        logging.getLogger("jaxpost").setLevel(logging.WARNING)


def _prepare(args, overrides: list[str]) -> dict:
    from jaxpost import config as config_lib
    from jaxpost import plan as plan_lib
    from jaxpost.data import pipeline, prepared

    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    config = plan_lib.resolve_hf_dir(config)  # the tokenizer training will use
    inputs = list(args.input)
    if not inputs:
        weights = pipeline.parse_mixture(config.data.train_path)
        if len(weights) > 1:
            raise ValueError(
                f"data.train_path={config.data.train_path!r} is a mixture: prepare each component "
                "(--input) into its own dataset and mix the prepared directories"
            )
        inputs = [weights[0][0]]
    manifest = prepared.prepare(
        inputs,
        args.out,
        dict(config.data),
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        workers=args.workers,
        skip_invalid=args.skip_invalid,
        overwrite=args.overwrite,
    )
    splits = ", ".join(f"{k}: {v['records']:,} records" for k, v in manifest["splits"].items())
    print(
        f"prepared {args.out} ({manifest['kind']}; {splits}; {manifest['skipped']:,} skipped) in "
        f"{manifest['prepare_seconds']:.1f}s; train with --config.data.train_path={args.out}"
        + (f" --config.data.eval_path={args.out}/eval" if "eval" in manifest["splits"] else "")
    )
    return manifest


def _before_after(before: dict, after: dict, start: int, end: int) -> str:
    parts = []
    shown = ("loss", "accuracy", "exact_match", "margin", "rewards/accuracies", "rewards/margins")
    for k, v in after.items():
        if k not in shown:
            continue
        if k in before:
            parts.append(f"eval {k} {before[k]:.4g} (step {start}) -> {v:.4g} (step {end})")
        else:
            parts.append(f"eval {k} {v:.4g} (step {end})")
    return "; ".join(parts)


def run() -> None:
    """Console entry point: user errors print one clear line, not a traceback; a stop request
    (SIGTERM) exits with status 75 after saving what a run can save."""
    env = malloc_env(os.environ, _libc())
    if env is not None and sys.executable:
        try:  # the same invocation (interpreter options, console script or -m) again
            os.execve(sys.executable, sys.orig_argv, env)
        except OSError:
            pass  # run as is
    from jaxpost.preemption import PREEMPTED_EXIT, Preempted, stop_at_once_on_sigterm

    stop_at_once_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax").setLevel(logging.WARNING)
    try:
        from jaxpost.data.records import DataError
        from jaxpost.train import NonFiniteLossError

        try:
            main()
        except (*_USAGE_ERRORS, DataError, NonFiniteLossError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"jaxpost: error: {msg}", file=sys.stderr)
            sys.exit(2)
    except Preempted as e:
        print(f"jaxpost: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    run()
