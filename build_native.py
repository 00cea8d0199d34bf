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

C_FLAGS = ["-std=c11", "-O3", "-Wall", "-Wextra", "-Werror", "-pthread", "-fno-math-errno"]


def public_declarations() -> str:
    """bitnet.h reduced to what cffi's cdef parser accepts (no preprocessor lines)."""
    text = (NATIVE / "bitnet.h").read_text()
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def sources() -> list[str]:
    # absolute: cffi's compile() runs the compiler from its tmpdir
    return sorted(str(p) for p in NATIVE.glob("*.c"))


ffibuilder = FFI()
ffibuilder.cdef(public_declarations())
ffibuilder.set_source(
    "bitnetd_trio._native",
    '#include "bitnet.h"',
    sources=sources(),
    include_dirs=[str(NATIVE)],
    extra_compile_args=C_FLAGS + os.environ.get("BITNETD_CFLAGS", "").split(),
    extra_link_args=["-pthread", "-lm"],
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose="-q" not in sys.argv)
    # compile() leaves the module under tmpdir/bitnetd_trio/; place it beside the package.
    for built in (ROOT / "build" / "cffi" / "bitnetd_trio").glob("_native*.so"):
        built.replace(ROOT / "bitnetd_trio" / built.name)
