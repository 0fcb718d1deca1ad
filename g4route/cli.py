"""The ``g4route`` command: ``info``, ``bench``, ``tune`` and ``check``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys

import torch

from . import __version__, kernel, platforms, registry, router_kernel

INFO_TOKENS = (1, 64, 4096, 262144)


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    facts = platforms.probe()
    if facts.cuda_available:
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if facts.xpu_available:
        devices += [torch.device("xpu", i) for i in range(torch.xpu.device_count())]
    return devices


def cmd_info(args) -> int:
    facts = platforms.probe()
    print(f"g4route {__version__}  python {platform.python_version()}  torch {facts.torch_version}  "
          f"triton {facts.triton_version or 'not installed'}")
    build = (f"CUDA {facts.cuda_version}" if facts.cuda_version
             else f"ROCm/HIP {facts.hip_version}" if facts.hip_version else "CPU-only")
    print(f"PyTorch build: {build}; torch.cuda.is_available(): {facts.cuda_available}; XPU: {facts.xpu_note}")
    forced = os.environ.get(registry.ENV_VAR, "").strip()
    print(f"{registry.ENV_VAR}: {forced or '(unset: automatic choice)'}")
    print(f"kernel limits: E <= {kernel.MAX_EXPERTS}, K <= {kernel.MAX_TOPK} (router(): E <= "
          f"{router_kernel.MAX_EXPERTS}, K <= {router_kernel.MAX_TOPK}); larger shapes go to the torch reference")
    print("\nbackends:")
    for b in registry.BACKENDS.values():
        reason = b.reason_unavailable(facts)
        print(f"  {b.name:<12} {'available' if reason is None else 'unavailable':<12} {b.summary}"
              + ("" if reason is None else f"\n  {'':<12} why not: {reason}"))
    print("\ndevices:")
    for device in _devices():
        names = " / ".join(n for n in platforms.device_names(device) if n)
        print(f"  {device}  ({names})")
        try:
            backend = registry.select(device, args.experts, args.topk)
        except ValueError as exc:
            print(f"    cannot route E={args.experts} K={args.topk}: {exc}")
            continue
        print(f"    E={args.experts} K={args.topk} -> backend {backend.name}")
        if not backend.uses_kernel:
            native = registry._native_backend(device, facts)
            why = registry.why_not(native, device, args.experts, args.topk, facts)
            if native is not backend and why:
                print(f"    ({native.name} not used: {why})")
            continue
        print(f"    table backends/{backend.table}.toml, family {backend.family_name(device)!r}")
        for dtype in (torch.bfloat16, torch.float32):
            cfgs = ", ".join(
                f"T={t}: {c.rows_per_program} rows/{c.num_warps} warps/{c.num_stages} stages"
                + (f"/{c.lanes_per_row} lanes a row" if c.lanes_per_row else "")
                for t in INFO_TOKENS for c in [backend.config_for(device, t, dtype)])
            print(f"    {str(dtype).removeprefix('torch.'):<9} {cfgs}")
        options = backend.router_options()
        product = "NumPy's float32" if backend.interpret else options["float32_dot"]
        squares = "x @ x.T" if options["squares_by_dot"] else "elementwise"
        print(f"    router() (block_t/block_h/split/warps/stages; float32 product {product}, "
              f"{'correctly rounded' if options['precise_norm'] else 'hardware'} norm, 16-bit squares {squares}):")
        for dtype in (torch.bfloat16, torch.float32):
            cfgs = ", ".join(f"T={t}: {'/'.join(str(v) for v in backend.router_config_for(device, t, dtype))}"
                             for t in INFO_TOKENS)
            print(f"    {str(dtype).removeprefix('torch.'):<9} {cfgs}")
    _print_engines()
    return 0


def _print_engines() -> None:
    """The serving engines installed here and whether g4route's plugin applies to each (no engine imported)."""
    from .adapters.engines import engine_reports

    print("\nserving engines (plugins: G4ROUTE_VLLM=0 / G4ROUTE_SGLANG=0 turn them off):")
    for report in engine_reports():
        print(f"  {report.describe()}")


def _progress(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: print(f"  .. {msg}", file=sys.stderr, flush=True))


def _default_device() -> str:
    facts = platforms.probe()
    return "cuda" if facts.cuda_available else "xpu" if facts.xpu_available else "cpu"


def cmd_bench(args) -> int:
    from . import bench

    device = torch.device(args.device or _default_device())
    if args.router and args.backward:
        raise SystemExit("g4route bench: --router and --backward are separate runs; pick one")
    if args.router:
        from . import bench_router

        tokens = args.tokens or ([1, 16, 256, 4096, 65536] if device.type != "cpu" else [1, 16, 256])
        rows, meta = bench_router.run_router_bench(device, tokens, [getattr(torch, d) for d in args.dtypes],
                                                   args.experts, args.topk, args.hidden, _progress(args.quiet))
        print(bench_router.format_router_table(rows, meta))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
        return 0
    if args.backward:
        tokens = args.tokens or ([1, 16, 256, 4096, 65536, 262144] if device.type != "cpu" else [1, 16, 256, 4096])
        use_compile = args.compile in ("default", "all") or (args.compile == "auto" and device.type != "cpu")
        rows, meta = bench.run_backward_bench(device, tokens, [getattr(torch, d) for d in args.dtypes],
                                              args.experts, args.topk, use_compile, _progress(args.quiet))
        print(bench.format_backward_table(rows, meta))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
        return 0
    tokens = args.tokens or [4**i for i in range(10) if 4**i <= (262144 if device.type != "cpu" else 16384)]
    choice = args.compile if args.compile != "auto" else "all" if device.type != "cpu" else "none"
    modes = {"none": [], "default": ["default"], "all": ["default", "max-autotune-no-cudagraphs"]}[choice]
    if device.type == "cpu":
        print("no GPU: timing route() on the PyTorch reference against stock routing (kernel numbers need a GPU)",
              file=sys.stderr)
    rows, meta = bench.run_bench(device, tokens, [getattr(torch, d) for d in args.dtypes], args.experts,
                                 args.topk, modes, _progress(args.quiet))
    print(bench.format_table(rows, meta, modes))
    if args.json:
        bench.write_json(args.json, rows, meta)
    if args.plot:
        bench.write_plot(args.plot, rows, meta)
    return 0


def cmd_tune(args) -> int:
    from . import tune

    args.tokens = args.tokens or [1, 16, 256, 4096, 65536, 262144]
    print(tune.run_tune(args, _progress(args.quiet)))
    return 0


def cmd_check(args) -> int:
    """Parity of the selected backend with the float64 oracle on a few shapes, on this device."""
    from .api import route
    from .bench import _check
    from .reference import reference_route

    device = torch.device(args.device or _default_device())
    failures = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for t, e, k in ((1, 128, 8), (7, 96, 8), (2048, 256, 1), (4099, 128, 8)):
            logits = torch.randn(t, e, device=device).to(dtype)
            scale = torch.rand(e, device=device) + 0.5
            backend = registry.select(device, e, k).name
            try:
                _check("route", route(logits, k, scale), reference_route(logits, k, scale, True, torch.float64), e)
                status = "ok"
            except AssertionError as exc:
                failures += 1
                status = f"FAILED: {exc}"
            print(f"{backend:<12} {str(dtype).removeprefix('torch.'):<9} T={t:<5} E={e:<4} K={k:<2} {status}")
    print("all checks passed" if not failures else f"{failures} checks failed")
    return 1 if failures else 0


def _tokens(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def _dtypes(text: str) -> list[str]:
    names = [d for d in text.split(",") if d]
    bad = [d for d in names if d not in ("float32", "bfloat16", "float16")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {bad}; use float32, bfloat16, float16")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="g4route",
        description="Gemma 4 MoE routing: one fused Triton kernel per GPU vendor. "
                    f"Set {registry.ENV_VAR}=<backend> to force a backend ({', '.join(registry.BACKENDS)}).")
    parser.add_argument("--version", action="version", version=f"g4route {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def shape_args(p):
        p.add_argument("--experts", "-E", type=int, default=128, help="experts per token row (default 128)")
        p.add_argument("--topk", "-K", type=int, default=8, help="experts chosen per token (default 8)")

    p = sub.add_parser("info", help="versions, devices, backends (and why not), chosen configs")
    shape_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="time g4route against eager and compiled PyTorch and the bandwidth floor")
    shape_args(p)
    p.add_argument("--device", help="device to run on (default: the GPU if any, else cpu)")
    p.add_argument("--tokens", type=_tokens, help="comma-separated token counts (default: powers of 4 to 262144; "
                                                  "16384 on CPU)")
    p.add_argument("--dtypes", type=_dtypes, default=["float32", "bfloat16"], help="default float32,bfloat16")
    p.add_argument("--compile", choices=["auto", "none", "default", "all"], default="auto",
                   help="torch.compile columns: none, default mode, or default and max-autotune-no-cudagraphs "
                        "(auto: all on a GPU, none on a CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also plot time and fraction of the floor (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--backward", action="store_true",
                   help="time forward+backward (gradients of the logits and the scale) against autograd of the "
                        "eager and compiled reference, with peak memory, and again with the scale frozen (no "
                        "scale gradient, as in LoRA fine-tuning) (default T: 1 to 262144 on a GPU, "
                        "to 4096 on a CPU; --compile none|default drops or keeps the compiled column)")
    p.add_argument("--router", action="store_true",
                   help="time the fused router (g4route.router: norm, projection and routing in one kernel) against "
                        "Transformers' router, the best unfused pipeline, route() alone and the floor (default T: 1 "
                        "to 65536 on a GPU; pass --dtypes bfloat16 for Gemma 4's dtype)")
    p.add_argument("--hidden", type=int, default=2816, help="--router: hidden size H (default 2816, Gemma 4 26B-A4B)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("tune", help="sweep launch configs on this GPU and emit a table family for backends/")
    shape_args(p)
    p.add_argument("--device", default="cuda", help="GPU to tune on (default cuda)")
    p.add_argument("--tokens", type=_tokens, help="token counts to tune at (default 1,16,256,4096,65536,262144)")
    p.add_argument("--dtypes", type=_dtypes, default=["float32", "bfloat16"],
                   help="float32 and/or bfloat16 (bfloat16 rows also serve float16); default both")
    p.add_argument("--stages", type=_tokens, default=[1], help="num_stages values to try (default 1)")
    p.add_argument("--family", help="family name in the table (default: from the device name)")
    p.add_argument("--match", action="append", help="device-name substring the family matches (repeatable)")
    p.add_argument("--write", metavar="TABLE.toml", help="add or replace the family in this table file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("check", help="parity of the selected backend with the float64 oracle on this device")
    p.add_argument("--device", help="device to check (default: the GPU if any, else cpu)")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad G4ROUTE_BACKEND, bad shapes: say it plainly, no traceback
        print(f"g4route: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
