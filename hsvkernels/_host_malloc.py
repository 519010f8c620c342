"""Keep freed host memory mapped, so that CPU timings do not include page faults (bench/, `hsvkernels bench`).

PyTorch's CPU tensors come straight from the C library's malloc. glibc serves an
allocation above its mmap threshold (128 KiB to 32 MiB, adjusted at run time)
with a fresh mmap and returns the heap's free top to the kernel once it exceeds
the trim threshold. Either way the next call's output is new memory, and its
first touch costs one page fault per 4 KiB page. On the 2-core VM the results
were taken on, that cost varied from run to run with the heap's layout and
dominated some layers: the 32 x 256 x 56 x 56 1x1 layer of ResNet-50 took 73 ms
dense, 66 ms composite and 24 ms fused with glibc's defaults, and 33, 22 and 12 ms
with the heap retained (one process each, same session).

`retain` turns mmap off for malloc (every block comes from the heap) and the
trim off, so freed blocks are reused warm: the steady state of a caching
allocator such as jemalloc or tcmalloc, which CPU inference deployments use
for the same reason. The first few allocations of a size may still fault (an
aligned block need not fit the hole its predecessor left until the heap
settles); a timing loop's warm-up calls cover them. `default` changes nothing,
and does not undo an earlier `retain`. Either way the choice is recorded with
the results.
"""
import ctypes
import ctypes.util

MODES = ("retain", "default")

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1

_state = {"mode": "default", "detail": "glibc defaults (not changed)"}


def _glibc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):   # not glibc (musl, macOS, Windows)
        return None
    return libc, version


def configure(mode):
    """Applies `mode` to the process's malloc ("retain"; "default" changes nothing); returns describe()."""
    if mode not in MODES:
        raise ValueError("host malloc mode must be one of %s, got %r" % (MODES, mode))
    if mode == "default":
        return describe()
    found = _glibc()
    if found is None:
        _state.update(mode="default", detail="not glibc: the C library's allocator left as it is")
        return describe()
    libc, version = found
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if not ok:
        raise RuntimeError("mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD=%d (glibc %s)" % (_INT_MAX, version))
    _state.update(mode="retain", detail="glibc %s: mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=%d (freed memory "
                                        "stays mapped; no page faults on reuse)" % (version, _INT_MAX))
    return describe()


def describe():
    return "%s: %s" % (_state["mode"], _state["detail"])


def add_argument(parser):
    parser.add_argument("--host-malloc", choices=MODES, default="retain",
                        help="retain: keep freed host memory mapped (glibc mallopt) so that timings exclude page "
                             "faults on fresh outputs; default: glibc as it comes. See hsvkernels/_host_malloc.py")
