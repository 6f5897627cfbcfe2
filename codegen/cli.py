"""The ``tilemix`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from tilemix.bench.demo import run_demo

    return run_demo(seed=args.seed)


def _cmd_bench(args: argparse.Namespace) -> int:
    from tilemix.bench.bench import run_bench

    return run_bench(args.ops or None, json_path=args.json)


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tilemix.ops import PROGRAMS
    from tilemix.tiles import TARGETS

    ops = Table(title="ops (tilemix.ops)")
    for column in ("op", "program", "parameters", "DSL lines"):
        ops.add_column(column)
    for name, program in PROGRAMS.items():
        ops.add_row(name, program.name, ", ".join(program.specs), str(program.source_lines))
    targets = Table(title="targets")
    for column in ("target", "what", "matmul dtypes", "carried-state budget"):
        targets.add_column(column)
    for target in TARGETS.values():
        budget = "unlimited" if target.carried_bytes is None else f"{target.carried_bytes // 1024} KiB"
        targets.add_row(target.name, target.description, ", ".join(map(str, target.mma_dtypes)), budget)
    console = Console()
    console.print(ops)
    console.print(targets)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from tilemix.ops import PROGRAMS
    from tilemix.ops.examples import example_specs
    from tilemix.tiles import TileError

    program = PROGRAMS[args.op]
    binding = program.bind(example_specs(args.op, args.dtype))
    if args.ir or args.arch == "cpu":
        print(program.trace(binding, target=args.arch))
        return 0
    if args.arch != "sm_90a":
        print(f"tilemix show: no code generator for {args.arch} yet (sm_90a only)", file=sys.stderr)
        return 2
    from tilemix.codegen.compile import compile_cuda, resources, sass
    from tilemix.codegen.launch import hopper_source

    try:
        source = hopper_source(program, binding)
    except TileError as e:
        print(f"tilemix show: {e}", file=sys.stderr)
        return 2
    if not (args.sass or args.resources):
        print(source.source)
        return 0
    compiled = compile_cuda(source.source, args.arch, source.name)
    if args.resources:
        usage = resources(compiled)
        print(f"{source.name} ({args.arch}): {usage['reg']} registers/thread, {usage['stack']} B stack, "
              f"{usage['local']} B local (spills), {source.smem_bytes} B dynamic shared memory, "
              f"{source.threads} threads/CTA")
    if args.sass:
        print(sass(compiled))
    return 0


def _parser() -> argparse.ArgumentParser:
    from tilemix.ops import PROGRAMS
    from tilemix.tiles import TARGETS

    parser = argparse.ArgumentParser(prog="tilemix", description="Tile-language sequence mixers.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every op and check it against the float64 reference")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_cmd_demo)
    sub.add_parser("list", help="list the ops and targets").set_defaults(run=_cmd_list)
    bench = sub.add_parser("bench", help="time ops beside their peers on the GPU")
    bench.add_argument("ops", nargs="*", help="ops to time (default: all lowered ops)")
    bench.add_argument("--json", help="write the records to this JSON file")
    bench.set_defaults(run=_cmd_bench)
    show = sub.add_parser("show", help="print an op's generated CUDA (or IR, SASS, resources) at the bench shape")
    show.add_argument("op", choices=sorted(PROGRAMS))
    show.add_argument("--arch", default="sm_90a", choices=sorted(TARGETS))
    show.add_argument("--ir", action="store_true", help="the traced, verified IR instead of CUDA")
    show.add_argument("--sass", action="store_true", help="compile and disassemble")
    show.add_argument("--resources", action="store_true", help="registers, stack/spill and shared memory")
    show.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    show.set_defaults(run=_cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
