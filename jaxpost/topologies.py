"""Where a step is compiled for: the local devices, or a TPU slice by name, without the TPU.

`parse_target("v5p-64")` maps a slice name to libtpu's topology (`v5p:2x4x4`; v4/v5p names count
TensorCores, two per chip, v5e/v6e names count chips) and its HBM per chip; `target_devices`
gives the slice's abstract (compile-only) devices when `libtpu` is installed
(`pip install 'jaxpost[tpu-aot]'`): a mesh over them compiles for that TPU on any machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

import jax

GiB = 1 << 30

# Slice shapes by chip count: 3D tori (v4, v5p) and 2D grids (v5e, v6e).
_CUBES = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16")
_GRIDS = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
# generation: (what the slice name counts per chip -- v4/v5p names count TensorCores, two per
# chip, v5e/v6e names count chips --, HBM GiB per chip, libtpu chip config, shapes)
GENERATIONS: dict[str, tuple[int, int, str, tuple[str, ...]]] = {
    "v4": (2, 32, "megacore", _CUBES),
    "v5p": (2, 95, "megacore", _CUBES),
    "v5e": (1, 16, "default", _GRIDS),
    "v6e": (1, 32, "default", _GRIDS),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the step is compiled for: the local devices, or a TPU slice."""

    name: str  # "local", "v5p-64", "v5p:2x4x4"
    generation: str = ""  # "v4", "v5p", "v5e", "v6e"; "" = local
    topology: str = ""  # libtpu's name, e.g. "v5p:2x4x4"
    chips: int = 0

    @property
    def is_tpu(self) -> bool:
        return bool(self.generation)

    @property
    def hbm_bytes(self) -> int | None:
        """Memory of one device (chip) of a TPU slice; None for local devices (see `available`)."""
        return GENERATIONS[self.generation][1] * GiB if self.is_tpu else None


def known_topologies() -> list[str]:
    return [
        f"{gen}-{_chips(shape) * per_chip}"
        for gen, (per_chip, _, _, shapes) in GENERATIONS.items()
        for shape in shapes
    ]


def _chips(shape: str) -> int:
    return math.prod(int(d) for d in shape.split("x"))


def parse_target(name: str | None) -> Target:
    """`None`/"local", a slice name (`v5p-64`: 32 chips; `v5e-16`, `v5litepod-16`: 16 chips) or a
    libtpu topology (`v5p:4x4x4`). Raises ValueError listing the known names."""
    if not name or name == "local":
        return Target("local")
    gen, sep, rest = name.partition(":") if ":" in name else name.partition("-")
    gen = _ALIASES.get(gen, gen)
    if gen in GENERATIONS and sep:
        per_chip, _, _, shapes = GENERATIONS[gen]
        if sep == ":" and re.fullmatch(r"\d+(x\d+){1,2}", rest):
            return Target(name, gen, f"{gen}:{rest}", _chips(rest))
        if sep == "-" and rest.isdigit():
            for shape in shapes:
                if _chips(shape) * per_chip == int(rest):
                    return Target(name, gen, f"{gen}:{shape}", _chips(shape))
    raise ValueError(
        f"--topology={name!r} is not a known TPU slice. Known: {', '.join(known_topologies())} "
        "(v4/v5p names count TensorCores, two per chip; v5e/v6e names count chips; "
        "v5litepod-N = v5e-N); or a libtpu topology GEN:AxBxC such as v5p:4x4x4."
    )


def target_devices(target: Target) -> list:
    """The local devices, or abstract (compile-only) devices of the TPU slice."""
    if not target.is_tpu:
        return jax.devices()
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            f"--topology={target.name} compiles for a TPU slice, which needs libtpu on this "
            "machine: pip install 'jaxpost[tpu-aot]' (or jax[tpu] of the installed jax version)."
        )
    # libtpu otherwise locks itself to one process per machine (/tmp/libtpu_lockfile); compiling
    # uses no chip, so a second `jaxpost plan`, or one beside a job on a TPU VM, may load it too.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {"chip_config_name": GENERATIONS[target.generation][2]}
    if target.chips == 1:
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kwargs)
    return list(desc.devices)
