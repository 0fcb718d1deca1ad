"""Reads the tuned launch tables in ``backends/`` and picks a config by device and token count.

A table (one TOML file per vendor) holds families of devices, each recognised by substrings of the
device's names, and per family a list of token-count buckets. See README.md, "Adding a device".
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .kernel import LaunchConfig
from .router_kernel import RouterConfig

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_CONFIG_KEYS = {"rows_per_program", "num_warps", "num_stages", "lanes_per_row"}
_ROUTER_KEYS = {"block_t", "block_h", "split", "num_warps", "num_stages"}


@dataclass(frozen=True)
class Bucket:
    """One table row: the config for ``T <= max_tokens`` (``None``: any T) and the listed dtypes."""

    max_tokens: int | None
    dtypes: tuple[str, ...]
    config: LaunchConfig | RouterConfig

    def serves(self, tokens: int, dtype_name: str) -> bool:
        return (self.max_tokens is None or tokens <= self.max_tokens) and (
            not self.dtypes or dtype_name in self.dtypes
        )


@dataclass(frozen=True)
class Family:
    """Devices recognised by ``match`` substrings, and their buckets in order."""

    name: str
    match: tuple[str, ...]
    buckets: tuple[Bucket, ...]
    provenance: str
    # The fused router's launch shapes (``router`` rows); empty: the table's default family's.
    router: tuple[Bucket, ...] = ()

    def matches(self, device_names: Sequence[str]) -> bool:
        names = [n.lower() for n in device_names]
        return any(m.lower() in n for m in self.match for n in names)

    def config_for(self, tokens: int, dtype: torch.dtype) -> LaunchConfig:
        return _first(self.buckets, tokens, dtype, self.name)

    def router_config_for(self, tokens: int, dtype: torch.dtype) -> RouterConfig | None:
        """The fused router's launch shape for ``tokens`` rows of ``dtype`` hidden states, or None where
        this family has no ``router`` rows."""
        return _first(self.router, tokens, dtype, self.name) if self.router else None


def _first(buckets: Sequence[Bucket], tokens: int, dtype: torch.dtype, family: str):
    dtype_name = _DTYPE_NAMES.get(dtype, str(dtype))
    for bucket in buckets:
        if bucket.serves(tokens, dtype_name):
            return bucket.config
    raise LookupError(f"family {family!r} has no bucket for T={tokens}, dtype={dtype_name}")


# The fused router's tensor-core precisions for float32 hidden states, each about float32's accuracy (the
# bound in router.py allows for them): three TF32 products (NVIDIA), six bfloat16 ones (AMD, which has no
# TF32x3 in Triton), or a float32 product off the tensor cores (ieee).
FLOAT32_DOTS = ("tf32x3", "bf16x6", "ieee")
# The backward's [rows, K, E] one-hot elements a tile where a table does not say (backward.config_for).
BACKWARD_ONE_HOT = 4096


@dataclass(frozen=True)
class Table:
    vendor: str
    families: tuple[Family, ...]
    default: Family
    source: str
    float32_dot: str = "tf32x3"  # the fused router's precision for float32 hidden states (FLOAT32_DOTS)
    precise_norm: bool = True  # the fused router's norm: correctly rounded sqrt and division, or the hardware's
    backward_one_hot: int = BACKWARD_ONE_HOT  # the backward's one-hot elements a tile (backward.config_for)
    # The backward writes a tile's zeros, then (after a barrier) each row's K values at their columns, instead
    # of spreading them by a one-hot: only where the barrier is known to order two stores to one address.
    backward_scatter: bool = False
    # The fused router takes 16-bit hidden states' sums of squares from a tensor-core product x @ x.T
    # (router_kernel.SQUARES_BY_DOT) instead of squaring them in registers.
    router_squares_by_dot: bool = False

    def router_options(self) -> dict:
        """The fused router's vendor-wide choices, as ``router_kernel.launch`` and ``constexprs`` take them."""
        return {"float32_dot": self.float32_dot, "precise_norm": self.precise_norm,
                "squares_by_dot": self.router_squares_by_dot}

    def family_for(self, device_names: Sequence[str]) -> Family:
        """The first family matching any of ``device_names``, else the vendor default."""
        for family in self.families:
            if family.matches(device_names):
                return family
        return self.default

    def router_config_for(self, family: Family, tokens: int, dtype: torch.dtype) -> RouterConfig:
        """The fused router's launch shape: ``family``'s ``router`` rows, else the default family's."""
        config = family.router_config_for(tokens, dtype) or self.default.router_config_for(tokens, dtype)
        if config is None:
            raise LookupError(f"{self.source}: neither family {family.name!r} nor [default] has router rows")
        return config


def tables_dir() -> Path:
    """Where the tables are: the installed ``g4route.tables`` package, else the source tree."""
    try:
        return Path(str(resources.files("g4route.tables")))
    except ModuleNotFoundError:  # running from a checkout without installing
        return Path(__file__).resolve().parent.parent / "backends"


def _parse_bucket(raw: dict, where: str) -> Bucket:
    unknown = set(raw) - _CONFIG_KEYS - {"max_tokens", "dtypes"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        config = LaunchConfig(
            rows_per_program=int(raw["rows_per_program"]),
            num_warps=int(raw["num_warps"]),
            num_stages=int(raw.get("num_stages", 1)),
            lanes_per_row=int(raw.get("lanes_per_row", 0)),
        )
    except KeyError as exc:
        raise ValueError(f"{where}: missing {exc.args[0]!r}") from None
    for knob in ("rows_per_program", "num_warps"):
        value = getattr(config, knob)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{where}: {knob} must be a power of two >= 1, got {value}")
    lanes = config.lanes_per_row
    if lanes < 0 or lanes & (lanes - 1):
        raise ValueError(f"{where}: lanes_per_row must be 0 (a whole row per load) or a power of two, got {lanes}")
    return _with_range(raw, config, where)


def _parse_router_bucket(raw: dict, where: str) -> Bucket:
    unknown = set(raw) - _ROUTER_KEYS - {"max_tokens", "dtypes"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        config = RouterConfig(block_t=int(raw["block_t"]), block_h=int(raw["block_h"]), split=int(raw.get("split", 1)),
                              num_warps=int(raw["num_warps"]), num_stages=int(raw.get("num_stages", 3)))
    except KeyError as exc:
        raise ValueError(f"{where}: missing {exc.args[0]!r}") from None
    for knob in ("block_t", "block_h", "num_warps"):
        value = getattr(config, knob)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{where}: {knob} must be a power of two, got {value}")
    if config.block_t < 16 or config.block_h < 16:
        raise ValueError(f"{where}: block_t and block_h must be at least 16 (the tensor cores' smallest tile)")
    if config.split < 1 or config.num_stages < 1:
        raise ValueError(f"{where}: split and num_stages must be at least 1")
    return _with_range(raw, config, where)


def _with_range(raw: dict, config, where: str) -> Bucket:
    dtypes = tuple(raw.get("dtypes", ()))
    bad = set(dtypes) - set(_DTYPE_NAMES.values())
    if bad:
        raise ValueError(f"{where}: unknown dtypes {sorted(bad)}")
    max_tokens = raw.get("max_tokens")
    return Bucket(None if max_tokens is None else int(max_tokens), dtypes, config)


def _parse_family(raw: dict, name: str, where: str) -> Family:
    unknown = set(raw) - {"name", "match", "buckets", "provenance", "note", "router"}
    if unknown:
        raise ValueError(f"{where}: family {name!r} has unknown keys {sorted(unknown)}")
    rows = raw.get("buckets")
    if not rows:
        raise ValueError(f"{where}: family {name!r} has no buckets")
    buckets = tuple(_parse_bucket(r, f"{where} [{name}] bucket {i}") for i, r in enumerate(rows))
    router = tuple(_parse_router_bucket(r, f"{where} [{name}] router {i}") for i, r in enumerate(raw.get("router", ())))
    for rows_of, kind in ((buckets, "bucket"), (router, "router row")):
        if rows_of and (rows_of[-1].max_tokens is not None or rows_of[-1].dtypes):
            raise ValueError(f"{where}: family {name!r} needs a last {kind} without max_tokens or dtypes")
    return Family(name, tuple(raw.get("match", ())), buckets, str(raw.get("provenance", "")), router)


def parse_table(text: str, source: str) -> Table:
    """Parse and check one table; errors name the file and the row."""
    raw = tomllib.loads(text)
    unknown = set(raw) - {"vendor", "family", "default", "float32_dot", "precise_norm", "backward_one_hot",
                            "backward_scatter", "router_squares_by_dot"}
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)}")
    float32_dot = str(raw.get("float32_dot", "tf32x3"))
    if float32_dot not in FLOAT32_DOTS:
        raise ValueError(f"{source}: float32_dot must be one of {', '.join(FLOAT32_DOTS)}, got {float32_dot!r}")
    families = tuple(
        _parse_family(f, str(f.get("name", f"#{i}")), source) for i, f in enumerate(raw.get("family", []))
    )
    if "default" not in raw:
        raise ValueError(f"{source}: a [default] family is required")
    precise_norm = raw.get("precise_norm", True)
    if not isinstance(precise_norm, bool):
        raise ValueError(f"{source}: precise_norm must be true or false, got {precise_norm!r}")
    one_hot = raw.get("backward_one_hot", BACKWARD_ONE_HOT)
    if isinstance(one_hot, bool) or not isinstance(one_hot, int) or one_hot < 1 or one_hot & (one_hot - 1):
        raise ValueError(f"{source}: backward_one_hot must be a power of two, got {one_hot!r}")
    flags = {}
    for name in ("backward_scatter", "router_squares_by_dot"):
        flags[name] = raw.get(name, False)
        if not isinstance(flags[name], bool):
            raise ValueError(f"{source}: {name} must be true or false, got {flags[name]!r}")
    return Table(str(raw.get("vendor", "")), families, _parse_family(raw["default"], "default", source), source,
                 float32_dot, precise_norm, one_hot, **flags)


@functools.cache
def load_table(vendor: str) -> Table:
    """The table ``backends/<vendor>.toml``, parsed once per process."""
    path = tables_dir() / f"{vendor}.toml"
    return parse_table(path.read_text(), str(path))
