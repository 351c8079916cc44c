"""Memory known before launch: the train step compiled ahead of time, and its bytes per device.

`plan(config, topology)` (`jaxpost plan`) checks the config as `plan.make_plan` does and builds
the train state's and batch's abstract shapes with their shardings for the config's mesh -- over
the local devices, or over a named TPU slice (`jaxpost.topologies`; compiled for on this machine,
nothing runs there) -- then compiles the train step and reads its `memory_analysis()`. When it
does not fit, `suggest` recompiles with one change at a time (full remat, more micro-batches, a
larger fsdp axis, chunked logits). No data is read: the batch is shapes only, laid out by the
data pipeline's own `to_row`. `train_step_report` is what `train` logs at start.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxpost import config as config_lib
from jaxpost import optim, sharding
from jaxpost import plan as plan_lib
from jaxpost import step as step_lib
from jaxpost.data import pipeline
from jaxpost.topologies import GiB, Target, parse_target, target_devices

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Setup:
    """A checked plan for a target's devices: what compiling its train step needs."""

    plan: plan_lib.Plan
    target: Target

    config = property(lambda self: self.plan.config)
    objective = property(lambda self: self.plan.objective)
    mesh = property(lambda self: self.plan.mesh)
    layout = property(lambda self: self.plan.layout)
    segments_per_row = property(lambda self: self.plan.packing["segments_per_row"])


def make_setup(config: ml_collections.ConfigDict, target: Target) -> Setup:
    """`plan.make_plan` for `target`'s devices (on a TPU slice `model.dtype="auto"` is bfloat16
    and logits chunking is decided for TPU); the tokenizer is loaded, the data is not."""
    devices = target_devices(target)
    backend = "tpu" if target.is_tpu else None
    try:
        plan_ = plan_lib.make_plan(config, devices=devices, backend=backend)
    except ValueError as e:
        if target.is_tpu and "does not map onto the devices" in str(e):
            raise ValueError(str(e).replace("the devices", target.topology, 1)) from None
        raise
    return Setup(plan_, target)


def abstract_batch(
    objective, layout, seq_len: int, segments_per_row: int, mesh
) -> dict[str, jax.ShapeDtypeStruct]:
    """The train batch as ShapeDtypeStructs `[accum_steps, micro_batch, ...]` (batch-sharded):
    the keys, row shapes and dtypes of `pipeline.to_row` for the objective's data kind, plus
    `ref_logps [S, 2]` per row when the objective precomputes its reference."""
    kind = objective.data_kind
    ex = pipeline.Example(np.zeros(2, np.int32), np.ones(2, np.int32))
    if pipeline.is_pairs(kind):
        ref = np.zeros(2, np.float32) if objective.reference == "precomputed" else None
        ex = pipeline.PairExample(ex, ex, ref_logps=ref)
    row = pipeline.to_row(ex, seq_len, kind)
    if "ref_logps" in row:  # one per packed segment
        row["ref_logps"] = np.zeros((segments_per_row, 2), row["ref_logps"].dtype)
    spec = sharding.batch_sharding(mesh)
    lead = (layout.accum_steps, layout.micro_batch)
    return {k: jax.ShapeDtypeStruct(lead + v.shape, v.dtype, sharding=spec) for k, v in row.items()}


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def _grad_bytes(params) -> int:
    """The step's float32 gradient accumulators, shaped and sharded like the params."""
    return sum(math.prod(p.sharding.shard_shape(p.shape)) * 4 for p in jax.tree.leaves(params))


def abstract_inputs(setup: Setup):
    """`(state, batch, frozen, state_shardings, frozen_shardings, tx, schedule)`: the train
    step's arguments as ShapeDtypeStructs with the shardings `train` gives them."""
    config, objective, mesh = setup.config, setup.objective, setup.mesh
    seq_len, num_steps = int(config.data.seq_len), int(config.train.num_steps)
    tx = optim.make_optimizer(config.optim, num_steps)
    schedule = optim.make_schedule(config.optim, num_steps)
    # (state shapes are made outside the mesh context: the rng key lives on the host)
    shardings = step_lib.state_shardings(objective.model, tx, mesh, seq_len=seq_len)
    state = step_lib.abstract_state(shardings, objective.model, tx, seq_len=seq_len)
    frozen = frozen_shardings = None
    if objective.frozen is not None:
        # the shardings `step.make_frozen` gets when it runs the hook on the sharded params
        frozen_shardings = jax.jit(objective.frozen).lower(state.params).compile().output_shardings
        shapes = jax.eval_shape(objective.frozen, state.params)
        frozen = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            frozen_shardings,
        )
    batch = abstract_batch(objective, setup.layout, seq_len, setup.segments_per_row, mesh)
    return state, batch, frozen, shardings, frozen_shardings, tx, schedule


@dataclasses.dataclass
class Report:
    """Bytes per device of one compile (`None` where the compile failed)."""

    target: Target
    mesh_shape: dict[str, int]
    num_params: int
    params: int
    opt_state: int
    grads: int  # float32 accumulators shaped and sharded like the params: part of `temp`
    frozen: int
    batch: int
    arguments: int | None = None
    outputs: int | None = None
    aliased: int | None = None  # outputs written into donated arguments (the state)
    temp: int | None = None  # activations, gradients, workspace
    code: int | None = None
    available: int | None = None  # per device; None when the device does not say
    needed: int | None = None  # from the compiler's out-of-memory error
    error: str = ""
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def peak(self) -> int | None:
        if self.temp is None:
            return self.needed
        return self.arguments + self.outputs - self.aliased + self.temp + self.code

    @property
    def fits(self) -> bool | None:
        if self.error:
            return False
        if self.available is None:
            return None
        return self.peak <= self.available


def device_memory_limit(device) -> int | None:
    """What a device says it can hold (`memory_stats()["bytes_limit"]`); None if it does not."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats raise
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective instructions in compiled HLO text, by kind. An async start/done pair counts
    once; one instruction may move several tensors (a tuple). The TPU compiler wraps a
    reduce-scatter as a fusion calling `%all-reduce-scatter...` (an all-reduce and a slice
    inside): it counts once, as a reduce-scatter."""
    kinds = "|".join(COLLECTIVES)
    op = re.compile(rf"^\s*(?:ROOT\s+)?%?[\w.\-]+ = .*? ({kinds})(?:-start)?\(")
    fused = re.compile(r"kind=kCustom, calls=%(all-reduce-scatter|" + kinds + r")\b")
    counts: collections.Counter = collections.Counter()
    inside_fused_collective = False
    for line in hlo_text.splitlines():
        if line.startswith("%") or line.startswith("ENTRY"):  # a computation starts
            name = line.split()[0].lstrip("%") if line.startswith("%") else ""
            inside_fused_collective = name.startswith(("all-reduce-scatter",) + COLLECTIVES)
            continue
        if inside_fused_collective:
            continue
        match = fused.search(line)
        if match:
            kind = match.group(1)
            counts["reduce-scatter" if kind == "all-reduce-scatter" else kind] += 1
            continue
        match = op.match(line)
        if match:
            counts[match.group(1)] += 1
    return {kind: counts[kind] for kind in COLLECTIVES if counts[kind]}


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_OUT_OF_MEMORY = (
    # "... the total memory required for HLO temporaries (219.42G) exceeds available HBM (95.74G)"
    r"required for [^(]*\(" + _SIZE + r"\) exceeds available [^(]*\(" + _SIZE + r"\)",
    # "Ran out of memory in memory space hbm. Used 20.5G of 15.48G hbm."
    r"Used " + _SIZE + r" of " + _SIZE,
)


def parse_out_of_memory(message: str) -> tuple[int, int] | None:
    """`(needed, available)` bytes from XLA's RESOURCE_EXHAUSTED compile error, if it says."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    for pattern in _OUT_OF_MEMORY:
        match = re.search(pattern, message)
        if match:
            return _to_bytes(*match.group(1, 2)), _to_bytes(*match.group(3, 4))
    return None


def _to_bytes(number: str, unit: str) -> int:
    return int(
        float(number) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    )


def _report(setup: Setup, state, batch, frozen) -> Report:
    """What the step's inputs take per device, and what a device offers."""
    return Report(
        target=setup.target,
        mesh_shape=dict(setup.mesh.shape),
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        params=_device_bytes(state.params),
        opt_state=_device_bytes(state.opt_state),
        grads=_grad_bytes(state.params),
        frozen=_device_bytes(frozen) if frozen is not None else 0,
        batch=_device_bytes(batch),
        available=setup.target.hbm_bytes or device_memory_limit(setup.mesh.devices.flat[0]),
    )


def compile_step(setup: Setup):
    """The train step's `(Compiled, report)` for `setup`; a compile that runs out of device
    memory gives `(None, report)` with the error and, when parsed, what it needed."""
    state, batch, frozen, shardings, frozen_shardings, tx, schedule = abstract_inputs(setup)
    report = _report(setup, state, batch, frozen)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        train_step = step_lib.make_train_step(
            setup.objective,
            tx,
            schedule,
            state_shardings=shardings,
            mesh=setup.mesh,
            frozen_shardings=frozen_shardings,
        )
        lowered = train_step.lower(state, batch, frozen)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        parsed = parse_out_of_memory(str(e))
        if parsed is not None:
            report.needed, report.available = parsed
        report.error = str(e).strip().splitlines()[0]
        return None, report
    fill_report(report, compiled)
    return compiled, report


def fill_report(report: Report, compiled) -> Report:
    """Copy a compiled step's memory analysis and collective counts into `report`."""
    stats = compiled.memory_analysis()
    if stats is not None:
        report.arguments = int(stats.argument_size_in_bytes)
        report.outputs = int(stats.output_size_in_bytes)
        report.aliased = int(stats.alias_size_in_bytes)
        report.temp = int(stats.temp_size_in_bytes)
        report.code = int(stats.generated_code_size_in_bytes)
    report.collectives = count_collectives(compiled.as_text() or "")
    return report


def candidate_changes(setup: Setup) -> list[list[str]]:
    """Single config changes (as overrides) that lower the step's memory per device."""
    config, mesh, layout = setup.config, setup.mesh, setup.layout
    changes = []
    if config.model.remat != "full":
        changes.append(["model.remat=full"])
    dp = sharding.data_parallel_size(mesh)
    if layout.micro_batch % (2 * dp) == 0:
        changes.append([f"train.accum_steps={2 * layout.accum_steps}"])
    data, fsdp, tensor = (mesh.shape[a] for a in sharding.AXES)
    if data > 1:
        changes.append(["mesh.data=1", f"mesh.fsdp={data * fsdp}", f"mesh.tensor={tensor}"])
    chunk = int(config.objective.logits_chunk_size)
    if setup.objective.params_kind == "causal_lm" and chunk == 0:
        changes.append([f"objective.logits_chunk_size={min(512, int(config.data.seq_len))}"])
    return changes


def suggest(setup: Setup) -> list[tuple[list[str], Report]]:
    """Each candidate change recompiled; all of them together too when none fits alone."""
    results = []
    for overrides in candidate_changes(setup):
        results.append((overrides, _compile_with(setup, overrides)))
    if len(results) > 1 and not any(r.fits for _, r in results):
        combined = [o for overrides, _ in results for o in overrides]
        results.append((combined, _compile_with(setup, combined)))
    return results


def _compile_with(setup: Setup, overrides: list[str]) -> Report:
    config = setup.config.copy_and_resolve_references()
    config_lib.apply_overrides(config, overrides)
    return compile_step(make_setup(config, setup.target))[1]


def _gib(n: int | None) -> str:
    """Bytes in GiB, or MiB/KiB/B when smaller."""
    if n is None:
        return "?"
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def verdict(report: Report) -> str:
    """'fits: X of Y', 'does not fit: X > Y', or 'X (the device reports no limit)'."""
    if report.error:
        needed = "?" if report.needed is None else _gib(report.needed)
        return (
            f"does not fit: {needed} > {_gib(report.available)} (the compile ran out of memory; "
            "the first number is the step's temporaries alone, before its arguments)"
        )
    if report.available is None:
        return f"{_gib(report.peak)} (the device reports no memory limit)"
    relation = "of" if report.fits else ">"
    word = "fits" if report.fits else "does not fit"
    return f"{word}: {_gib(report.peak)} {relation} {_gib(report.available)}"


def format_report(report: Report, setup: Setup | None = None) -> str:
    """The per-device summary `jaxpost plan` prints and `train` logs."""
    t = report.target
    where = (
        f"{t.name} ({t.topology}, {t.chips} chips, {_gib(t.hbm_bytes)} HBM each)"
        if t.is_tpu
        else "the local devices"
    )
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh_shape.items())
    lines = [f"train step compiled for {where}; mesh {mesh}"]
    if setup is not None:
        m, lay = setup.config.model, setup.layout
        lines.append(
            f"  {setup.objective.name}, seq_len {setup.config.data.seq_len}, batch "
            f"{lay.global_batch} = {lay.accum_steps} x {lay.micro_batch}; compute {m.dtype}, "
            f"params {m.param_dtype}, remat {m.remat}"
        )
    rows = [
        ("parameters", report.params, f"{report.num_params:,} in all"),
        ("optimizer state", report.opt_state, ""),
        ("gradients", report.grads, "float32 accumulators, within temporaries"),
    ]
    if report.frozen:
        rows.append(("frozen (reference)", report.frozen, ""))
    rows.append(("batch", report.batch, ""))
    if report.temp is not None:
        rows += [
            ("arguments", report.arguments, "state, batch, frozen"),
            ("outputs", report.outputs, f"{_gib(report.aliased)} written into donated inputs"),
            ("temporaries", report.temp, "activations, gradients, workspace"),
            ("generated code", report.code, ""),
        ]
    lines.append("  per device:")
    for name, value, note in rows:
        lines.append(f"    {name:<20}{_gib(value):>12}" + (f"   ({note})" if note else ""))
    lines.append(f"  peak per device: {verdict(report)}")
    if report.error:
        lines.append(f"  compiler: {report.error}")
    if report.collectives:
        counts = ", ".join(f"{k} {v}" for k, v in report.collectives.items())
        lines.append(f"  collectives: {counts}")
    return "\n".join(lines)


def plan(config: ml_collections.ConfigDict, topology: str | None = None, *, try_changes=True):
    """`jaxpost plan`: print the step's memory per device for `topology`; when it does not
    fit, and `try_changes`, each change from `candidate_changes` recompiled. Returns
    `{"report": Report, "changes": [(overrides, Report), ...]}`."""
    target = parse_target(topology)  # an unknown name fails before anything is built
    setup = make_setup(config, target)
    report = compile_step(setup)[1]
    print(format_report(report, setup), flush=True)
    changes = []
    if try_changes and report.fits is False:
        print("  does not fit; recompiling with one change at a time:", flush=True)
        for overrides, new in suggest(setup):
            flags = " ".join(f"--config.{o}" for o in overrides)
            print(f"    {flags}: {verdict(new)}", flush=True)
            changes.append((overrides, new))
        if not any(new.fits for _, new in changes):
            print("  none fits, alone or together: try a larger slice (more chips)", flush=True)
    return {"report": report, "changes": changes}


def train_step_report(train_step, state, frozen, plan_: plan_lib.Plan):
    """`(Compiled, Report)` of `train`'s jitted step for its real state: lowered with the
    batch's abstract shapes and compiled once (a later call with a real batch reuses it)."""
    setup = Setup(plan_, Target("local"))
    batch = abstract_batch(
        plan_.objective, plan_.layout, plan_.seq_len, setup.segments_per_row, plan_.mesh
    )
    compiled = train_step.lower(state, batch, frozen).compile()
    report = _report(setup, state, batch, frozen)
    return compiled, fill_report(report, compiled)
