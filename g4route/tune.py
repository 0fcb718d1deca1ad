"""``g4route tune``: sweep launch configs on this device and write a table family for ``backends/``.

Each candidate is checked against the float64 oracle before it is timed; a candidate that computes a
wrong answer is reported and never chosen.
"""

from __future__ import annotations

import datetime
import itertools
import re
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import torch

from . import kernel, registry
from .bench import _check, _device_name, _inputs, time_us
from .configs import parse_table
from .kernel import LaunchConfig
from .reference import reference_route

ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
WARPS = (1, 2, 4, 8)
LANES = (0, 1, 2, 4, 8, 16)  # lanes per row; 0: a whole row per load
# 16-bit logits share one kernel variant (EXACT32 keys); float32 has its own (truncated keys, exact re-checks).
DTYPE_GROUPS = {"float32": ("float32",), "bfloat16": ("bfloat16", "float16")}


# Logits per thread worth trying: fewer leaves threads idle, more spills or starves the SM of warps.
MIN_PER_THREAD, MAX_PER_THREAD = 4, 64


def candidates(tokens: int, block_e: int, stages: tuple[int, ...], itemsize: int = 4,
               warp_size: int = 32) -> list[LaunchConfig]:
    """Distinct configs worth timing at ``tokens`` rows: no tile taller than the work, a tile that gives
    each thread between MIN_PER_THREAD and MAX_PER_THREAD logits (compiles are the slow part), and, where
    a row takes fewer lanes than a warp, enough rows that every warp holds whole rows (otherwise the
    spare lanes split rows again and the reductions cross warps)."""
    seen = []
    for rows, warps, lanes, st in itertools.product(ROWS, WARPS, LANES, stages):
        cfg = LaunchConfig(rows, warps, st, lanes).clamp(block_e)
        per_thread = cfg.rows_per_program * block_e / (warp_size * cfg.num_warps)
        if cfg.rows_per_program > max(1, 1 << (tokens - 1).bit_length()) or cfg in seen:
            continue
        if not MIN_PER_THREAD <= per_thread <= MAX_PER_THREAD and not (cfg.rows_per_program == 1 and warps == 1):
            continue
        if lanes and cfg.rows_per_program * lanes < warp_size * warps and cfg.rows_per_program > 1:
            continue
        if lanes and cfg.chunk(block_e, itemsize) == block_e:  # the same tile as lanes_per_row = 0
            continue
        seen.append(cfg)
    return seen


def sweep(
    device: torch.device,
    tokens: list[int],
    dtype: torch.dtype,
    num_experts: int,
    topk: int,
    stages: tuple[int, ...],
    progress: Callable[[str], None],
) -> dict[int, tuple[LaunchConfig, float, list]]:
    """For each T, the fastest correct config, its time, and every (config, us) measured."""
    scale = torch.rand(num_experts, device=device) + 0.5
    block_e = 1 << (num_experts - 1).bit_length()
    results = {}
    for t in tokens:
        inputs = _inputs(t, num_experts, dtype, device)
        oracle = reference_route(inputs[0], topk, scale, True, torch.float64)
        out = (torch.empty(t, topk, device=device), torch.empty(t, topk, dtype=torch.int32, device=device))
        measured = []
        for cfg in candidates(t, block_e, stages, dtype.itemsize):
            def call(x, cfg=cfg, out=out):
                kernel.launch(x, topk, scale, True, out[0], out[1], cfg)
                return out
            try:
                _check(str(cfg), call(inputs[0]), oracle, num_experts)
            except AssertionError as exc:
                progress(f"  REJECTED {cfg}: {exc}")
                continue
            measured.append((cfg, time_us(call, inputs, device)))
        best = min(measured, key=lambda m: m[1])
        progress(f"{str(dtype).removeprefix('torch.')} T={t}: best {best[0]} {best[1]:.2f} us "
                 f"({len(measured)} candidates)")
        results[t] = (best[0], best[1], measured)
    return results


def buckets(best: dict[int, LaunchConfig]) -> list[tuple[int | None, LaunchConfig]]:
    """Bucket rows from the best config per measured T: each covers T up to its measured size; equal
    neighbours merge; the last row has no upper bound."""
    rows: list[tuple[int | None, LaunchConfig]] = []
    for t in sorted(best):
        if rows and rows[-1][1] == best[t]:
            rows[-1] = (t, best[t])
        else:
            rows.append((t, best[t]))
    rows[-1] = (None, rows[-1][1])
    return rows


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bucket_line(max_tokens: int | None, cfg: LaunchConfig, dtypes: tuple[str, ...]) -> str:
    parts = [] if max_tokens is None else [f"max_tokens = {max_tokens}"]
    if dtypes:
        parts.append("dtypes = [" + ", ".join(_toml_str(d) for d in dtypes) + "]")
    parts += [f"rows_per_program = {cfg.rows_per_program}", f"num_warps = {cfg.num_warps}",
              f"num_stages = {cfg.num_stages}"]
    if cfg.lanes_per_row:
        parts.append(f"lanes_per_row = {cfg.lanes_per_row}")
    return "  { " + ", ".join(parts) + " },"


def family_toml(name: str, match: list[str], provenance: str, per_dtype: dict[str, list], header: str) -> str:
    """One ``[[family]]`` block. Rows for each dtype group carry a ``dtypes`` filter, except the last
    group, whose rows serve every dtype (so the family always has a catch-all row)."""
    lines = [header, "[[family]]", f"name = {_toml_str(name)}",
             "match = [" + ", ".join(_toml_str(m) for m in match) + "]",
             f"provenance = {_toml_str(provenance)}", "buckets = ["]
    groups = list(per_dtype.items())
    for i, (group, rows) in enumerate(groups):
        last = i == len(groups) - 1
        for max_tokens, cfg in rows:
            lines.append(_bucket_line(max_tokens, cfg, () if last else DTYPE_GROUPS[group]))
    lines.append("]")
    return "\n".join(lines) + "\n"


def update_table(path: Path, name: str, block: str) -> None:
    """Put ``block`` into the table at ``path``, replacing the family called ``name`` if present."""
    text = path.read_text()
    pattern = re.compile(
        r"(?:^# tuned: [^\n]*\n)?^\[\[family\]\]\nname = " + re.escape(_toml_str(name)) + r"\n.*?^\]\n",
        re.M | re.S)
    text, count = pattern.subn(lambda m: block, text)
    if not count:
        marker = text.find("[default]")
        text = text[:marker] + block + "\n" + text[marker:] if marker >= 0 else text + "\n" + block
    parse_table(text, str(path))  # never write a table the loader would reject
    tomllib.loads(text)
    path.write_text(text)


def run_tune(args, progress: Callable[[str], None]) -> str:
    device = torch.device(args.device)
    backend = registry.select(device, args.experts, args.topk)
    if not backend.uses_kernel or backend.interpret:
        raise SystemExit(f"g4route tune needs a GPU backend; {device} selects {backend.name!r}")
    tokens = args.tokens
    per_dtype: dict[str, list] = {}
    for group in args.dtypes:
        res = sweep(device, tokens, getattr(torch, group), args.experts, args.topk, tuple(args.stages), progress)
        per_dtype[group] = buckets({t: r[0] for t, r in res.items()})
    name = args.family or _family_name(_device_name(device))
    provenance = (f"g4route tune on {_device_name(device)}, {datetime.date.today().isoformat()}, "
                  f"E={args.experts} K={args.topk}, torch {torch.__version__}, "
                  f"triton {kernel.triton.__version__}: {' '.join(['g4route', *sys.argv[1:]])}")
    header = f"# tuned: {name} ({_device_name(device)}), written by g4route tune"
    block = family_toml(name, args.match or [name.upper()], provenance, per_dtype, header)
    if args.write:
        update_table(Path(args.write), name, block)
        progress(f"wrote family {name!r} into {args.write}")
    return block


def _family_name(device_name: str) -> str:
    match = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", device_name)
    return (match.group(1) if match else re.sub(r"\W+", "_", device_name)).lower()
