"""The ``tilemix`` command line."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from tilemix.bench.demo import run_demo

    return run_demo(seed=args.seed)


def _cmd_bench(args: argparse.Namespace) -> int:
    from tilemix.bench.bench import CASES, run_bench

    if args.cp:
        from tilemix.bench.cp import run_cp_bench

        return 0 if run_cp_bench(json_path=None if args.json == "auto" else args.json) is not None else 1
    if args.host:
        from tilemix.bench.host import run_host_bench

        return 0 if run_host_bench(json_path=None if args.json == "auto" else args.json) is not None else 1
    unknown = sorted(name for name in args.ops if name not in CASES and ":" not in name)  # module:kernel: a program
    if unknown:  # before anything asks for a GPU
        print(f"tilemix bench: unknown op(s) {unknown}; expected some of {sorted(CASES)}", file=sys.stderr)
        return 2
    try:  # a user's program: loaded before anything asks for a GPU
        programs = {name: _user_kernel(name) for name in args.ops if ":" in name}
    except ValueError as e:
        print(f"tilemix bench: {e}", file=sys.stderr)
        return 2
    return run_bench(args.ops or None, json_path=args.json, sweep=args.sweep, plot_dir=args.plot,
                     head_dims=tuple(args.head_dim or ()), md_path=args.md, target=args.target,
                     peers=not args.no_peers, programs=programs, grid=args.grid, kernels=args.kernels)


def _cmd_plot(args: argparse.Namespace) -> int:
    from tilemix.bench.plots import main

    return main(args.json, args.out, md=args.md)


def _tunable() -> list[str]:
    """What ``tilemix tune`` takes: each op (its forward program) and ``<op>-bwd`` (the programs its
    backward launches)."""
    from tilemix.ops import PROGRAMS

    return [*PROGRAMS, *(f"{name}-bwd" for name in PROGRAMS)]


def _cmd_tune(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from tilemix.ops import use_target

    console = Console(width=max(Console().width, 150))  # the table's config column unwrapped when piped
    unknown = sorted(name for name in args.ops if name not in _tunable() and ":" not in name)
    if unknown:
        console.print(f"tilemix tune: unknown op(s) {unknown}; expected some of {_tunable()}, or module:kernel")
        return 2
    try:  # a user's program: loaded before anything asks for a GPU
        programs = {name: _user_kernel(name) for name in args.ops if ":" in name}
    except ValueError as e:
        console.print(f"tilemix tune: {e}")
        return 2
    if not torch.cuda.is_available():
        console.print("tilemix tune needs a CUDA GPU.")
        return 1
    with use_target(args.target):  # the candidates, the default and the cache entries: that target's
        return _tune_ops(args, console, programs)


def _tune_ops(args: argparse.Namespace, console, programs: dict) -> int:
    """Tune each op of ``args.ops`` (all when none), ``programs`` (module:kernel -> its @kernel) too."""
    import torch
    from rich.table import Table

    from tilemix.ops import PROGRAMS, SEGMENTED
    from tilemix.ops.examples import example_inputs, kernel_inputs
    from tilemix.ops.runtime import device_arch

    B, T, H, D = args.shape
    arch = device_arch(torch.cuda.current_device())
    table = Table(title=f"tilemix tune on {torch.cuda.get_device_name()}, {arch} kernels (B={B} T={T} H={H} D={D})")
    for column in ("op", "default ms", "tuned ms", "speedup", "tuned config", "candidates", "rejected", "tune s"):
        table.add_column(column)
    for name in args.ops or list(PROGRAMS):
        if name.endswith("-bwd"):
            for kernel, inputs in _backward_programs(name, args.shape):  # a row each, named by the program
                _tune_program(kernel.name, kernel, inputs, table, console, args.verbose, arch)
            continue
        if name in programs:  # each named dim of the program D
            inputs = kernel_inputs(programs[name], B=B, T=T, H=H, size=D)
            _tune_program(programs[name].name, programs[name], inputs, table, console, args.verbose, arch)
            continue
        inputs = example_inputs(name, B=B, T=T, H=H, D=D)
        _tune_program(name, PROGRAMS[name], inputs, table, console, args.verbose, arch)
        if name in SEGMENTED:  # the sequential scan (now tuned) against sequence segments
            _tune_segment_count(name, SEGMENTED[name], inputs, T, table, console, args.verbose)
    console.print(table)
    return 0


def _backward_programs(name: str, shape) -> list:
    """(kernel, arguments) of each program the backward of op ``name[:-4]`` launches at ``shape``
    (B, T, H, D; bf16), the first call of each, as the bench's backward row runs it."""
    import torch

    from tilemix.bench.bench import CASES
    from tilemix.ops.runtime import capture_calls

    backward = CASES[name](*shape, torch.bfloat16)[0]
    backward()  # the forward (its first call only), then a backward
    with capture_calls() as calls:
        backward()  # the backward alone
    programs: dict = {}
    for kernel, inputs in calls:  # saved for the backward, some inputs still require grad: the tune's calls do not
        inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        programs.setdefault(kernel.name, (kernel, inputs))
    return list(programs.values())


def _tune_program(label: str, kernel, inputs: dict, table, console, verbose: bool, arch: str) -> None:
    """Tune one program at ``inputs`` and add its row to ``table``."""
    import time

    import torch
    from rich.progress import Progress

    from tilemix.codegen.schedule import config_space, launch_schedule
    from tilemix.ops.runtime import tune

    binding = kernel.bind(inputs)
    total = len(config_space(kernel, binding, launch_schedule(kernel, binding, torch.cuda.current_device(), arch)))
    start = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"tuning {label}", total=total)
        result = tune(kernel, inputs, progress=lambda config, task=task: bar.advance(task))
    default, best = result.times[result.default], result.times[result.best]
    table.add_row(label, f"{default:.3f}", f"{best:.3f}", f"{default / best:.2f}x", result.best.describe(),
                  str(len(result.times) + len(result.rejected)), str(len(result.rejected)),
                  f"{time.perf_counter() - start:.1f}")
    if verbose:
        for config, why in result.rejected.items():
            console.print(f"  {label} rejected {config.describe()}: {why}")
        for config, ms in sorted(result.times.items(), key=lambda kv: kv[1]):
            console.print(f"  {label} {ms:.3f} ms  {config.describe()}")


def _tune_segment_count(name: str, scan, inputs: dict, T: int, table, console, verbose: bool) -> None:
    """Time the tuned sequential scan against sequence segments; add the row."""
    import time

    from rich.progress import Progress

    from tilemix.codegen.schedule import segment_choices
    from tilemix.ops.runtime import tune_segments

    start = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"segments of {name}", total=len(segment_choices(T)))
        segments = tune_segments(scan, inputs, progress=lambda _, task=task: bar.advance(task))
    default, best = segments.times[segments.default], segments.times[segments.best]
    table.add_row(f"{name} (segments)", f"{default:.3f}", f"{best:.3f}", f"{default / best:.2f}x",
                  f"segments={segments.best}", str(len(segments.times) + len(segments.rejected)),
                  str(len(segments.rejected)), f"{time.perf_counter() - start:.1f}")
    if verbose:
        for count, ms in sorted(segments.times.items(), key=lambda kv: kv[1]):
            console.print(f"  {name} {ms:.3f} ms  segments={count}")
        for count, why in segments.rejected.items():
            console.print(f"  {name} rejected segments={count}: {why}")


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tilemix.codegen.structure import PANEL
    from tilemix.ops import PROGRAMS
    from tilemix.tiles import TARGETS

    ops = Table(title="ops (tilemix.ops)")
    for column in ("op", "program", "parameters", "DSL lines"):
        ops.add_column(column)
    for name, program in PROGRAMS.items():
        ops.add_row(name, program.name, ", ".join(program.specs), str(program.source_lines))
    targets = Table(title="targets", caption=f"CPU tensors run the interpreter at any size; the ops' GPU kernels take "
                    f"head dims in multiples of {PANEL}")
    for column in ("target", "what", "tile dims", "matmul dtypes", "carried-state budget"):
        targets.add_column(column)
    for target in TARGETS.values():
        budget = "unlimited" if target.carried_bytes is None else f"{target.carried_bytes // 1024} KiB"
        dims = "any size" if target.fragment is None else f"1 or multiples of {target.fragment}"
        targets.add_row(target.name, target.description, dims, ", ".join(map(str, target.mma_dtypes)), budget)
    console = Console(width=max(Console().width, 120))  # the tables unwrapped when piped
    console.print(ops)
    console.print(targets)
    return 0


def _user_kernel(ref: str):
    """``module:name`` -> that module's ``@kernel`` (a user's program for ``tilemix show``), the
    module importable from here (the current directory is searched first, as ``python -m`` does)."""
    import importlib
    import os

    from tilemix.tiles import Kernel

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module, _, name = ref.partition(":")
    module = _as_package_module(module)
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {ref!r}: {e}") from None
    if not isinstance(found, Kernel):
        raise ValueError(f"{ref!r} is a {type(found).__name__}, not a @kernel program")
    return found


def _as_package_module(module: str) -> str:
    """``module`` as ``tilemix.`` + its path where the current directory is a tilemix checkout and the
    module one of its files (``ops.gated`` from the repository's root): imported under its own name,
    the package's ops would register a second time."""
    import importlib.util
    from pathlib import Path

    from tilemix import ops

    root = Path(ops.__file__).resolve().parent.parent  # tilemix is a namespace package: no __file__
    path = Path.cwd().joinpath(*module.split("."))
    if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
        return module
    path = path.resolve()
    if not path.is_relative_to(root) or path == root:
        return module
    parts = path.relative_to(root).parts
    return "tilemix." + ".".join(parts) if importlib.util.find_spec(f"tilemix.{parts[0]}") else module


def _show_binding(args: argparse.Namespace):
    """The program ``tilemix show`` names and its binding at the bench shape, ``--dim`` applied."""
    from tilemix.ops import PROGRAMS
    from tilemix.ops.examples import example_specs, kernel_specs

    sizes = dict(args.dim or ())
    if args.op in PROGRAMS:
        return PROGRAMS[args.op], PROGRAMS[args.op].bind(example_specs(args.op, args.dtype, sizes=sizes))
    if ":" in args.op:
        program = _user_kernel(args.op)
        return program, program.bind(kernel_specs(program, sizes, args.dtype))
    raise ValueError(f"unknown op {args.op!r}: one of {sorted(PROGRAMS)}, or module:kernel for your own")


def _cmd_show(args: argparse.Namespace) -> int:
    from tilemix.tiles import TileError

    arch = "sm_90" if args.target == "generic" and args.arch == "sm_90a" else args.arch  # generic on a Hopper
    if args.target == "hopper" and arch != "sm_90a":
        print(f"tilemix show: --target hopper is sm_90a, not {arch}", file=sys.stderr)
        return 2
    try:
        program, binding = _show_binding(args)
        if args.ir or arch == "cpu":
            print(program.trace(binding, target=arch))
        if arch != "cpu":  # lowered as a launch lowers it, $TILEMIX_SCHEDULE's fields applied: a run's errors
            from tilemix.codegen.schedule import default_schedule, overridden
            from tilemix.codegen.specialise import kernel_source

            schedule = overridden(program, default_schedule(program, binding, arch))
            source = kernel_source(program, binding, schedule, arch)
    except (ValueError, TypeError, TileError) as e:
        print(f"tilemix show: {e}", file=sys.stderr)
        return 2
    if args.ir or arch == "cpu":
        return 0
    if not (args.sass or args.resources):
        print(source.source)
        return 0
    from tilemix.codegen.compile import MissingTool, compile_cuda, resources, sass

    try:
        compiled = compile_cuda(source.source, arch, source.name)
        usage = resources(compiled) if args.resources else None
        code = sass(compiled) if args.sass else None
    except MissingTool as e:
        print(f"tilemix show: {e}", file=sys.stderr)
        return 1
    if usage is not None:  # the stack frame is local memory: spills and local arrays
        print(f"{source.name} ({arch}): {usage['reg']} registers/thread, {usage['local_memory']} B local memory "
              f"({usage['stack']} B stack), {source.smem_bytes} B dynamic shared memory, {source.threads} threads/CTA")
    if code is not None:
        print(code)
    return 0


def _dim(text: str) -> tuple[str, int]:
    name, _, size = text.partition("=")
    if not name or not size.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE, e.g. K=64; got {text!r}")
    return name, int(size)


def _parser() -> argparse.ArgumentParser:
    from tilemix.ops import PROGRAMS
    from tilemix.tiles import TARGETS, __version__

    parser = argparse.ArgumentParser(prog="tilemix", description="Tile-language sequence mixers.")
    parser.add_argument("--version", action="version", version=f"tilemix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every op and check it against the float64 reference")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_cmd_demo)
    sub.add_parser("list", help="list the ops and targets").set_defaults(run=_cmd_list)
    bench = sub.add_parser("bench", help="time ops beside their peers on the GPU")
    bench.add_argument("ops", nargs="*", help="ops to time (default: all lowered ops), or module:kernel (your own "
                       "@kernel program, each named dim D, no peer)")
    bench.add_argument("--json", nargs="?", const="auto", metavar="PATH",
                       help="write the records to this JSON file (no PATH: bench/results/<gpu>-<date>.json)")
    bench.add_argument("--md", metavar="PATH", help="write the run as a RESULTS.md section (markdown table)")
    shapes = bench.add_mutually_exclusive_group()
    shapes.add_argument("--sweep", action="store_true",
                       help="sequence lengths 1k-64k (batch x heads x length constant), head dims 64, 128 and 256, "
                            "for the ops given (default: linear_attention, ssd, attention; backward rows such "
                            "as ssd-bwd too)")
    shapes.add_argument("--grid", action="store_true",
                       help="batch x heads 1-256 by sequence lengths 1k-128k (as memory allows) at head dims 64 and "
                            "128, for the ops given (default: linear_attention, ssd, ssd-mamba); --plot draws each "
                            "op's speedup over its peer as a heat map")
    bench.add_argument("--head-dim", type=int, action="append", help="sweep head dims (default: 64, 128, 256)")
    bench.add_argument("--plot", metavar="DIR", help="write PNG plots of the run here (needs matplotlib)")
    bench.add_argument("--target", choices=["auto", "hopper", "generic"],
                       help="the backend our ops run on (generic: the mma.sync kernels, also on an H100)")
    bench.add_argument("--kernels", action="store_true",
                       help="under each row, the kernels our call launches and their ms per call (torch.profiler): "
                            "where its time goes; records keep them as \"kernels\"")
    bench.add_argument("--no-peers", action="store_true",
                       help="time our ops only (no peer columns): skips fla's minutes of first-call autotuning")
    bench.add_argument("--cp", action="store_true",
                       help="context parallelism over this host's GPUs (NCCL): weak scaling of linear_attention and "
                            "ssd, strong scaling of causal ring attention, forward + backward (--json PATH: records)")
    bench.add_argument("--host", action="store_true",
                       help="host µs per call of a signature seen before (GPU kept busy ahead, no CUDA events): "
                            "forward, forward + backward and decode steps at small shapes (--json PATH: records)")
    bench.set_defaults(run=_cmd_bench)
    plot = sub.add_parser("plot", help="PNG plots from a bench JSON file (needs matplotlib)")
    plot.add_argument("json")
    plot.add_argument("out", help="directory for the PNGs")
    plot.add_argument("--md", action="store_true", help="also write results.md (the run's markdown table) there")
    plot.set_defaults(run=_cmd_plot)
    tune = sub.add_parser("tune", help="search schedules and block sizes on this GPU; cache the winners")
    tune.add_argument("ops", nargs="*", help=f"ops to tune: {', '.join(sorted(PROGRAMS))} (default: all); "
                      "<op>-bwd tunes the programs that op's backward launches, at the shapes it runs them; "
                      "module:kernel tunes your own @kernel program (each named dim D)")
    tune.add_argument("--shape", type=lambda s: tuple(int(x) for x in s.split(",")), default=(8, 4096, 16, 128),
                      metavar="B,T,H,D", help="the problem to tune for (default 8,4096,16,128)")
    tune.add_argument("-v", "--verbose", action="store_true", help="every candidate's time or why it was rejected")
    tune.add_argument("--target", choices=["auto", "hopper", "generic"],
                      help="the kernels to tune (generic: the mma.sync ones, also on an H100); each has its own cache")
    tune.set_defaults(run=_cmd_tune)
    show = sub.add_parser("show", help="print an op's generated CUDA (or IR, SASS, resources) at the bench shape, "
                          "with $TILEMIX_SCHEDULE's fields applied as a launch applies them")
    show.add_argument("op", help=f"one of {', '.join(sorted(PROGRAMS))}, or module:kernel (your own @kernel program)")
    show.add_argument("--dim", action="append", metavar="NAME=SIZE", type=_dim,
                      help="a named dim's size, e.g. --dim K=64 (B, T, H and G too; default: the bench shape for "
                           "the ops, 128 for module:kernel programs)")
    show.add_argument("--arch", default="sm_90a", choices=sorted(TARGETS),
                      help="sm_90a: the Hopper kernel; sm_80/86/89/90: the generic mma.sync kernel")
    show.add_argument("--target", default="auto", choices=["auto", "hopper", "generic"],
                      help="generic: the mma.sync kernel (for --arch sm_90a: the one an H100 runs when forced)")
    show.add_argument("--ir", action="store_true", help="the traced, verified IR instead of CUDA")
    show.add_argument("--sass", action="store_true", help="compile and disassemble")
    show.add_argument("--resources", action="store_true", help="registers, stack/spill and shared memory")
    show.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    show.set_defaults(run=_cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:  # `tilemix show ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit's flush writes nowhere
        return 141  # what a shell reports for a command ended by SIGPIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
