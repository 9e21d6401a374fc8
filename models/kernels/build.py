"""The C kernels of csrc/: built into one shared library on first use, and bound from their header.

`library(march)` compiles every csrc/*.c with `cc -O3 -march=native -fopenmp`, linked to the
libgomp that torch ships so that torch and the kernels share one OpenMP runtime and thread
pool, and caches it under ~/.cache/llm-shard/kernels (LLM_SHARD_KERNEL_CACHE) by a hash of
the sources, the compiler, the flags and this CPU's feature flags. `ffi()` declares what
csrc/w8a16.h declares between its "bindings" markers (cffi, ABI mode); `load(march)` opens
the library, its entry points taking addresses as Python ints (a tensor's data_ptr()).

`python -m llm_shard.models.kernels.build --warnings` compiles each variant with -Wall
-Wextra, uncached, and prints what the compiler says.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import cffi
import torch

CSRC = Path(__file__).parent / "csrc"
HEADER = CSRC / "w8a16.h"
BINDINGS = ("/* bindings: begin */", "/* bindings: end */")
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
WARNINGS = ("-Wall", "-Wextra")
# what the kernel's tests load: this CPU's best, AVX2 with FMA, plain C; and AVX512-VNNI,
# which `--warnings` compiles whether or not this CPU runs it
MARCHES = ("native", "haswell", "x86-64", "icelake-server")


def cache_dir() -> Path:
    env = os.environ.get("LLM_SHARD_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm-shard" / "kernels"


@functools.cache
def cpu_info() -> dict[str, str]:
    """/proc/cpuinfo's fields, each as its first CPU gives it ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _sources() -> dict[str, str]:
    """csrc's files by name: the header and every .c file, which one library is built from."""
    return {p.name: p.read_text() for p in sorted(CSRC.iterdir()) if p.suffix in (".c", ".h")}


def _compiler() -> tuple[str, str]:
    """(the C compiler, its --version text); RuntimeError where there is none."""
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C compiler ({cc}: {e}); set CC or install gcc") from None
    return cc, version


def _link() -> list[str]:
    found = sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
    if not found:
        raise RuntimeError("torch ships no libgomp here: the kernel would bring a second "
                           "OpenMP runtime")
    gomp = found[0]
    return [f"-L{gomp.parent}", f"-l:{gomp.name}", f"-Wl,-rpath,{gomp.parent}", "-lm"]


def _compile(cc: str, flags: list[str], link: list[str], sources: dict[str, str],
             so: Path) -> subprocess.CompletedProcess:
    """The sources written to so's folder (the files hashed are the files compiled), then
    compiled into so."""
    for name, text in sources.items():
        so.parent.joinpath(name).write_text(text)
    files = [str(so.parent / n) for n in sources if n.endswith(".c")]
    return subprocess.run([cc, *flags, *files, "-o", str(so), *link], capture_output=True,
                          text=True, timeout=300)


def library(march: str = "native") -> Path:
    """The kernel library for `march` (built once, cached); raises RuntimeError saying why
    it cannot be built."""
    link = _link()
    cc, version = _compiler()
    flags = [f"-march={march}", *FLAGS]
    sources = _sources()
    key = hashlib.sha256("\0".join([*(f"{n}\0{t}" for n, t in sources.items()), cc, version,
                                    *flags, *link, cpu_info().get("flags", "")]).encode())
    out = cache_dir() / f"w8a16-{march}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / "w8a16.so"
        done = _compile(cc, flags, link, sources, so)
        if done.returncode:
            raise RuntimeError(f"{cc} failed to build the w8a16 kernel: "
                               f"{done.stderr.strip()[-500:]}")
        os.replace(so, out)  # atomic: workers building at once all get a whole file
    return out


def warnings(marches: tuple[str, ...] = MARCHES) -> dict[str, str]:
    """What the compiler says about the sources with -Wall -Wextra, per march ('' where
    nothing); a failed build raises RuntimeError with it."""
    cc, _ = _compiler()
    link, sources, said = _link(), _sources(), {}
    for march in marches:
        with tempfile.TemporaryDirectory() as tmp:
            done = _compile(cc, [f"-march={march}", *FLAGS, *WARNINGS], link, sources,
                            Path(tmp) / "w8a16.so")
        if done.returncode:
            raise RuntimeError(f"-march={march}: {cc} failed:\n{done.stderr}")
        said[march] = done.stderr.strip()
    return said


def declarations() -> str:
    """The header's text between its bindings markers: structs, entry points, integer
    constants."""
    text = HEADER.read_text()
    begin, end = (text.index(m) for m in BINDINGS)
    return text[begin + len(BINDINGS[0]):end]


_FFI: list[cffi.FFI] = []  # the one FFI, made on first use: parsing the header is slow
_FFI_LOCK = threading.Lock()


def ffi() -> cffi.FFI:
    """cffi's view of the header's declarations, one per process (the entry points take
    the structs of that one): build the structs with it."""
    if not _FFI:
        with _FFI_LOCK:
            if not _FFI:
                f = cffi.FFI()
                f.cdef(declarations())
                _FFI.append(f)
    return _FFI[0]


def _by_address(fn_type) -> str:
    """A C function type with each pointer parameter as intptr_t."""
    args = ", ".join("intptr_t" if a.kind == "pointer" else a.cname for a in fn_type.args)
    return f"{fn_type.result.cname}(*)({args or 'void'})"


class Library:
    """The built library's entry points and integer constants, as the header declares them,
    but each pointer parameter taken as an address, a Python int (0: NULL), passed as an
    intptr_t: on every ABI this targets, the same register or stack slot as the pointer."""

    def __init__(self, path: Path) -> None:
        f = ffi()
        self.path = path
        self._handle = f.dlopen(str(path))  # kept open while its entry points are in use
        for name in dir(self._handle):
            item = getattr(self._handle, name)
            setattr(self, name, item if isinstance(item, int)
                    else f.cast(_by_address(f.typeof(item)), item))


@functools.cache
def load(march: str = "native") -> Library:
    return Library(library(march))


def address(cdata) -> int:
    """The address of memory that `ffi().new` allocated, for an entry point."""
    return int(ffi().cast("intptr_t", cdata))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_shard.models.kernels.build",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--warnings", action="store_true",
                        help="compile each variant with -Wall -Wextra and print what the "
                             "compiler says (uncached)")
    parser.add_argument("--march", action="append",
                        help=f"a -march to compile for (repeatable; default {MARCHES})")
    args = parser.parse_args(argv)
    if not args.warnings:
        print(library())
        return 0
    noisy = 0
    for march, said in warnings(tuple(args.march or MARCHES)).items():
        print(f"-march={march}: {said or 'no warnings'}")
        noisy += bool(said)
    return 1 if noisy else 0


if __name__ == "__main__":
    sys.exit(main())
