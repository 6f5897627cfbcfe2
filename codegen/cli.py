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

    program = PROGRAMS[args.op]
    print(program.trace(target=args.target, **example_specs(args.op, args.dtype)))
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
    show = sub.add_parser("show", help="print an op's traced IR at an example shape")
    show.add_argument("op", choices=sorted(PROGRAMS))
    show.add_argument("--target", default="cpu", choices=sorted(TARGETS))
    show.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    show.set_defaults(run=_cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
