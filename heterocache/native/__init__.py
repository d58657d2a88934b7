"""Optional native (C) fast paths for the CPU, compiled on first use and called through ``ctypes``.

``refill.c`` fuses one layer's dynamic-slot refill (index scoring, top-k, pairing, block copies) into
one call; the PyTorch path in ``methods/heterocache/dynamic.py`` is its reference (tests/test_native.py).
The library is built with the system C compiler (``$CC``, else ``cc``) into
``cache_root() / "native" / <hash>/`` (``$HETEROCACHE_CACHE_DIR/native``, by default
``~/.cache/heterocache/native``; the hash covers the source, the flags and this CPU, since
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

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


class RefillJob(ctypes.Structure):
    """The argument of ``hc_refill`` (``hc_job`` in refill.c, field for field; every field 8 bytes)."""

    _fields_ = [("n", _I), ("rows", _I), ("dim", _I), ("channels", _I), ("pages", _I), ("group", _I),
                ("queries", _P), ("qmat", _P), ("qscale", _P), ("alpha", _F),
                ("summaries", _P), ("summary_int8", _I), ("base", _P), ("stick", _F), ("page_lse", _I),
                ("resident", _P), ("width", _I), ("counts", _P), ("current", _P),
                ("tier_keys", _P), ("tier_values", _P), ("token_bytes", _I), ("page_positions", _P), ("unit", _I),
                ("seq_bucket", _P), ("seq_row", _P),
                ("nbuckets", _I), ("buckets", _P),  # 4 x nbuckets: keys, values, positions addresses; capacities
                ("drift", _F), ("anchors", _P), ("anchored", _P), ("anchor_rows", _I),  # the drift gate
                ("skipped", _I)]  # out: sequences not refilled by the call


_library: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def cache_dir() -> Path:
    """Folder of the built libraries: ``cache_root() / "native"`` (follows ``HETEROCACHE_CACHE_DIR``)."""
    from heterocache.store import cache_root

    return cache_root() / "native"


def _cpu_tag() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((line for line in text.splitlines() if line.startswith(("model name", "flags"))), "")
    except OSError:
        model = ""
    return f"{platform.machine()}|{platform.processor()}|{model}"


def _build(compiler: str, flag_sets=FLAG_SETS) -> Path:
    source = SOURCE.read_bytes()
    errors = []
    for flags in flag_sets:
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


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.hc_refill.restype = ctypes.c_int64
    library.hc_refill.argtypes = [ctypes.POINTER(RefillJob)]
    library.hc_block.restype = ctypes.c_int64
    library.hc_block.argtypes = []
    library.hc_kernel.restype = ctypes.c_char_p  # "avx2" or "portable": which scoring kernel was compiled
    library.hc_kernel.argtypes = []
    return library


def refill_library() -> ctypes.CDLL | None:
    """The compiled ``refill.c`` (built once per machine), or None when it cannot be built or loaded."""
    global _library, _reason, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("HETEROCACHE_NATIVE", "1") == "0":
        _reason = "disabled by HETEROCACHE_NATIVE=0"
        return None
    compiler = _compiler()
    if compiler is None:
        _reason = "no C compiler found (set CC, or install gcc)"
        return None
    try:
        _library = _load(_build(compiler))
    except OSError as err:
        _reason = f"could not build or load {SOURCE.name}: {err}"
        return None
    return _library


def library_built_with(flags: list[str]) -> ctypes.CDLL:
    """``refill.c`` built with exactly ``flags`` (tests: e.g. ``-DHC_PORTABLE`` for the portable scoring
    kernel on a machine whose default build uses AVX2); raises OSError when it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler found (set CC, or install gcc)")
    return _load(_build(compiler, [flags]))


def unavailable_reason() -> str | None:
    """Why :func:`refill_library` returned None (None when it is available or was not tried)."""
    return _reason
