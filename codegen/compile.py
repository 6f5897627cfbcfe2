"""CUDA C++ → cubin for an exact architecture, through NVRTC, with a disk cache.

NVRTC comes from the ``cuda-bindings`` and ``nvidia-cuda-nvrtc`` wheels, so
kernels compile on machines without a GPU (CI inspects their SASS). The
cache key covers the source, the tile headers, the flags, the compiler
version and the arch; entries are written atomically (temp file + rename)
with a checksum, so concurrent processes never read half a file and a
damaged entry is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from .env import cache_root

__all__ = ["Compiled", "CompileError", "MissingTool", "compile_cuda", "include_dir", "ptxas_report", "sass",
           "resources"]

_MAGIC = b"tilemix-cubin-v1\n"


class CompileError(RuntimeError):
    """NVRTC rejected generated code; the message carries the log and the offending source lines."""


class MissingTool(RuntimeError):
    """NVRTC, cuobjdump or nvdisasm is not installed: the message names the extra that brings them."""


CODEGEN_EXTRA = "pip install 'tilemix[codegen]'"


@dataclass(frozen=True)
class Compiled:
    cubin: bytes
    arch: str
    source: str
    log: str

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.cubin)
        return path


def include_dir() -> Path:
    """The device tile headers (package data of ``tilemix.tiles``)."""
    import tilemix.tiles

    return Path(tilemix.tiles.__file__).resolve().parent / "include"


@functools.lru_cache(maxsize=1)
def _headers_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(include_dir().rglob("*.cuh")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise MissingTool(f"compiling kernels needs NVRTC: {CODEGEN_EXTRA} "
                          "(cuda-bindings and nvidia-cuda-nvrtc)") from e
    return nvrtc


def _check(result, what: str):
    err, *rest = result
    nvrtc = _nvrtc()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def nvrtc_version() -> str:
    major, minor = _check(_nvrtc().nvrtcVersion(), "nvrtcVersion")
    return f"{major}.{minor}"


def _flags(arch: str) -> list[str]:
    return [f"--gpu-architecture={arch}", "-std=c++17", f"-I{include_dir()}", "--device-as-default-execution-space",
            "-lineinfo", "-DNDEBUG"]


def _cache_dir() -> Path | None:
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, delete=True)
        probe.close()
        return root
    except OSError:
        warnings.warn(f"tilemix: cache dir {root} is not writable; compiled kernels stay in memory", stacklevel=3)
        return None


_MEMORY: dict[str, Compiled] = {}


def _with_source_lines(log: str, source: str) -> str:
    lines = source.splitlines()
    out = [log.rstrip()]
    for m in re.finditer(r"\((\d+)\): error", log):
        n = int(m.group(1))
        if 0 < n <= len(lines):
            out.append(f"  generated line {n}: {lines[n - 1].strip()}")
    return "\n".join(out)


def _nvrtc_compile(source: str, arch: str, name: str, extra_flags: tuple[str, ...] = ()) -> Compiled:
    nvrtc = _nvrtc()
    program = _check(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        flags = [f.encode() for f in _flags(arch) + list(extra_flags)]
        (err,) = nvrtc.nvrtcCompileProgram(program, len(flags), flags)
        size = _check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
        log = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
        log = log.decode(errors="replace").rstrip("\x00")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC could not compile {name} for {arch}:\n{_with_source_lines(log, source)}")
        size = _check(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return Compiled(cubin, arch, source, log)


def compile_cuda(source: str, arch: str, name: str = "kernel") -> Compiled:
    """Compile ``source`` for ``arch`` (e.g. ``sm_90a``), from cache when possible."""
    key = hashlib.sha256("\x00".join([source, _headers_digest(), " ".join(_flags(arch)), nvrtc_version(),
                                      arch]).encode()).hexdigest()
    if key in _MEMORY:
        return _MEMORY[key]
    cache = _cache_dir()
    path = cache / f"{key}.cubin" if cache else None
    if path is not None and path.exists():
        blob = path.read_bytes()
        digest, _, cubin = blob[len(_MAGIC):].partition(b"\n")
        if blob.startswith(_MAGIC) and hashlib.sha256(cubin).hexdigest().encode() == digest:
            _MEMORY[key] = Compiled(cubin, arch, source, "")
            return _MEMORY[key]
    compiled = _nvrtc_compile(source, arch, name)
    if path is not None:
        blob = _MAGIC + hashlib.sha256(compiled.cubin).hexdigest().encode() + b"\n" + compiled.cubin
        try:  # write aside, then rename: a reader sees the old file or the whole new one, never a part
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                tmp.write(blob)
            os.replace(tmp.name, path)
        except OSError as e:
            warnings.warn(f"tilemix: could not write {path} ({e}); the kernel stays in memory", stacklevel=2)
    _MEMORY[key] = compiled
    return compiled


# -- inspection -----------------------------------------------------------------
def ptxas_report(source: str, arch: str, name: str = "kernel") -> str:
    """What ptxas says of ``source`` (compiled afresh with ``-Xptxas -v``): registers, spills, and
    performance remarks, e.g. C7515 when it serialises wgmma instructions."""
    log = _nvrtc_compile(source, arch, name, ("-Xptxas", "-v")).log
    return "\n".join(line for line in log.splitlines() if line.startswith("ptxas"))


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        roots = []
    else:
        roots = nvidia.__path__
    for root in roots:
        candidate = Path(root) / "cu13" / "bin" / name
        if candidate.exists():
            return str(candidate)
    raise MissingTool(f"{name} not found: {CODEGEN_EXTRA} (nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm)")


def _cuobjdump(compiled: Compiled, flag: str) -> str:
    cuobjdump = _tool("cuobjdump")
    env = dict(os.environ, PATH=f"{Path(_tool('nvdisasm')).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    with tempfile.TemporaryDirectory() as tmp:
        path = compiled.save(Path(tmp) / "kernel.cubin")
        return subprocess.run([cuobjdump, flag, str(path)], check=True, capture_output=True, text=True,
                              env=env).stdout


def sass(compiled: Compiled) -> str:
    """The SASS disassembly."""
    return _cuobjdump(compiled, "-sass")


def resources(compiled: Compiled) -> dict[str, int]:
    """Registers, shared/local/stack bytes per thread or block, as ptxas reports them, and
    ``local_memory``: all the local memory a thread uses, its stack frame (where spills and local
    arrays live, and what the SASS's LDL/STL read and write) included."""
    text = _cuobjdump(compiled, "-res-usage")
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL|CONSTANT\[\d+\]|TEXTURE|SURFACE|SAMPLER):(\d+)", text))
    usage = {k.lower(): int(v) for k, v in fields.items() if not k.startswith("CONSTANT")}
    return {**usage, "local_memory": usage.get("stack", 0) + usage.get("local", 0)}
