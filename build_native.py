"""cffi build script: compiles native/ into the extension module bitnetd_trio._native.

API mode, out of line. `pip install .` / `pip install -e .` run it through setup.py's
cffi_modules; `python build_native.py` builds the module in place by hand.

Only the default ISA is assumed for the bulk of the engine; SIMD kernels carry their own
`__attribute__((target(...)))` and are chosen at run time by CPU detection, so one build
runs on any x86-64 (and the scalar path everywhere else).
"""

import os
import re
import sys
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
NATIVE = ROOT / "native"
#: every C source of the engine: native/*.c and the kernel sets in native/kernels/*.c
SOURCES = sorted(NATIVE.glob("*.c")) + sorted((NATIVE / "kernels").glob("*.c"))

C_FLAGS = ["-std=c11", "-O3", "-Wall", "-Wextra", "-Werror", "-pthread", "-fno-math-errno"]


def public_declarations() -> str:
    """bitnet.h reduced to what cffi's cdef parser accepts (no preprocessor lines)."""
    text = (NATIVE / "bitnet.h").read_text()
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.DOTALL)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def make_builder(absolute_paths: bool) -> FFI:
    """setuptools wants paths relative to setup.py; cffi's compile() runs the compiler from
    its tmpdir and so needs absolute ones."""

    def path(p: Path) -> str:
        return str(p) if absolute_paths else os.path.relpath(p, ROOT)

    builder = FFI()
    builder.cdef(public_declarations())
    builder.set_source(
        "bitnetd_trio._native",
        '#include "bitnet.h"',
        sources=[path(p) for p in SOURCES],
        include_dirs=[path(NATIVE)],
        extra_compile_args=C_FLAGS + os.environ.get("BITNETD_CFLAGS", "").split(),
        extra_link_args=["-pthread", "-lm"],
    )
    return builder


ffibuilder = make_builder(absolute_paths=False)  # named by setup.py's cffi_modules

if __name__ == "__main__":
    os.chdir(ROOT)
    builder = make_builder(absolute_paths=True)
    builder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose="-q" not in sys.argv)
    # compile() leaves the module under tmpdir/bitnetd_trio/; place it beside the package,
    # replacing any module pip built (its .abi3.so would otherwise shadow or be shadowed).
    for stale in (ROOT / "bitnetd_trio").glob("_native*.so"):
        stale.unlink()
    for built in (ROOT / "build" / "cffi" / "bitnetd_trio").glob("_native*.so"):
        built.replace(ROOT / "bitnetd_trio" / built.name)
