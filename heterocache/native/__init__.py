"""Optional native (C) fast paths for the CPU, compiled on first use and called through ``ctypes``.

``refill.c`` fuses one layer's dynamic-slot refill (index scoring, top-k, pairing, block copies) into
one call; the PyTorch path in ``methods/heterocache/dynamic.py`` is its reference (tests/test_native.py).
The library is built with the system C compiler (``$CC``, else ``cc``) into
``~/.cache/heterocache/native/<hash>/`` (the hash covers the source, the flags and this CPU, since
``-march=native`` code only runs where it was built). Without a compiler, or with
``HETEROCACHE_NATIVE=0``, :func:`refill_library` returns None and callers use the PyTorch path;
:func:`unavailable_reason` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("refill.c")
FLAG_SETS = (["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"], ["-O3", "-march=native", "-fPIC", "-shared"],
             ["-O3", "-fPIC", "-shared"])

_library: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("HETEROCACHE_CACHE", Path.home() / ".cache" / "heterocache")) / "native"


def _cpu_tag() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((line for line in text.splitlines() if line.startswith(("model name", "flags"))), "")
    except OSError:
        model = ""
    return f"{platform.machine()}|{platform.processor()}|{model}"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        digest = hashlib.sha256(source + " ".join([compiler, *flags]).encode() + _cpu_tag().encode()).hexdigest()[:16]
        target = cache_dir() / digest / "libhcrefill.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename atomically
            built = Path(tmp) / target.name
            done = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE), "-lm"],
                                  capture_output=True, text=True, check=False)
            if done.returncode == 0:
                os.replace(built, target)
                return target
            errors.append(f"{compiler} {' '.join(flags)}: {done.stderr.strip()[-400:]}")
    raise OSError("; ".join(errors))


def refill_library() -> ctypes.CDLL | None:
    """The compiled ``refill.c`` (built once per machine), or None when it cannot be built or loaded."""
    global _library, _reason, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("HETEROCACHE_NATIVE", "1") == "0":
        _reason = "disabled by HETEROCACHE_NATIVE=0"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        _reason = "no C compiler found (set CC, or install gcc)"
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except OSError as err:
        _reason = f"could not build or load {SOURCE.name}: {err}"
        return None
    function = library.hc_refill
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    function.restype = i64
    function.argtypes = [i64, i64, i64, i64, i64, i64,  # n, rows, dim, channels, pages, group
                         p, p, p, f32,  # queries, qmat, qscale, alpha
                         p, i32, p, f32, i32,  # summaries, summary_int8, base, stick, page_lse
                         p, i64, p, p,  # resident, width, counts, current
                         p, p, i64, p, i64,  # tier keys / values, token_bytes, page_positions, unit
                         p, p, p]  # seq_bucket, seq_row, buckets (keys, values, positions, capacity per bucket)
    _library = library
    return library


def unavailable_reason() -> str | None:
    """Why :func:`refill_library` returned None (None when it is available or was not tried)."""
    return _reason
