"""Per-layer benchmark: dense F.conv2d vs torch.ops.hsv.conv2d vs the reference chain.

For every suite layer, batch size and decomposition method, all three run on the
same input in the same process, timed in interleaved rounds, so that their
ratios are comparable even on a noisy machine. See bench/README.md.

    python bench/layers.py --quick
    python bench/layers.py --device cuda --dtype bfloat16 --channels-last --batch 1,32,128
    python bench/layers.py --device cuda --methods svd --impls composite,fused
    python bench/layers.py --fused --methods hsv,svd --channels-min 128 --batch 1,8,32 --threads 1

On CPU, --fused adds the hand-written fused kernels as a fourth path (the op
with HSV_CPU_IMPL=fused; "op" is then pinned to HSV_CPU_IMPL=composite), with
fused/dense, fused/op (= fused/composite) and achieved GFLOP/s as a share of
this machine's measured FMA peak (bench/peak.py, single core x threads).

On CUDA (or with --roofline on) every path also gets its achieved TFLOP/s and
GB/s against the device's measured ceilings (bench/ceilings.py: a large matmul
in the same dtype and flags, a large copy) and its share of the roofline bound.
"""
import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:   # run as a script: import this checkout's hsvkernels, not an installed one
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import hsvkernels  # noqa: E402
from hsvkernels import _host_malloc  # noqa: E402
from bench import ceilings, suite, timing  # noqa: E402
from hsvkernels._timing import capture_graph  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Normalized max error max|y - y_exact| / max|y_exact| above which an output is wrong (not merely imprecise).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TOLERANCE_TF32 = 5e-3
QUICK_TAGS = ("L3", "L5", "L6")   # a 3x3, a strided 3x3 and a 1x1 layer


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m],
                   help="comma list of decomposition methods (default: all of hsvkernels.METHODS)")
    p.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=[1, 32])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--channels-last", action="store_true", help="input and dense weight in channels_last")
    p.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                   help="CUDA: set cudnn.allow_tf32 and cuda.matmul.allow_tf32 both on or off")
    p.add_argument("--impls", type=lambda s: [m for m in s.split(",") if m], default=[],
                   help="also time the op under each of these implementations (HSV_CPU_IMPL or HSV_CUDA_IMPL, "
                        "set before every call), e.g. composite,fused; ratios in the note column")
    p.add_argument("--graph", action="store_true",
                   help="CUDA: time replays of a CUDA graph captured from each callable (after warm-up) "
                        "instead of eager calls: kernel time without launch overhead")
    p.add_argument("--ratio", type=float, default=4.0, help="parameter compression asked of every method")
    p.add_argument("--macs-ratio", type=float, default=4.0,
                   help="MAC reduction asked of methods that accept macs_ratio (0: never ask)")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per callable (default 1.0, quick 0.1)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per layer (default 3, quick 2)")
    p.add_argument("--min-blocks", type=int, help="timed blocks per callable at least (default 5, quick 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: layers %s unless selected otherwise, short timing" % ",".join(QUICK_TAGS))
    p.add_argument("--fused", action="store_true",
                   help="CPU: also time the fused kernels (HSV_CPU_IMPL=fused) against the composite op")
    p.add_argument("--peak-seconds", type=float, default=1.0,
                   help="with --fused: seconds spent measuring the FMA peak (bench/peak.py)")
    p.add_argument("--roofline", choices=["auto", "on", "off"], default="auto",
                   help="measure the device's ceilings (bench/ceilings.py) and report every path against them; "
                        "auto: on CUDA only")
    p.add_argument("--ceiling-seconds", type=float, default=1.0, help="seconds spent measuring the ceilings")
    p.add_argument("--out", help="output path without extension (default bench/results/layers-<device>-<date>)")
    suite.add_filter_args(p)
    _host_malloc.add_argument(p)
    args = p.parse_args(argv)
    if args.min_run_time is None:
        args.min_run_time = 0.1 if args.quick else 1.0
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.min_blocks is None:
        args.min_blocks = 3 if args.quick else 5
    return args


def select_layers(args):
    filtered = any(getattr(args, k) for k in ("model", "channels_min", "channels_max", "kernel", "stride",
                                               "layers", "tags", "shape"))
    if args.quick and not filtered:
        args.tags = list(QUICK_TAGS)
    layers = suite.select_from_args(args)
    if not layers:
        raise SystemExit("layers.py: no layer matches the filters")
    return layers


# Decomposition ----------------------------------------------------------------------------

def accepts(fn, option):
    """Whether a method's decompose function takes keyword `option` (or **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == option or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def decompose(weight, method, args):
    """(config, Factorization or None, refusal message or None, seconds)."""
    config = {"ratio": args.ratio}
    if args.macs_ratio and accepts(hsvkernels.METHODS[method], "macs_ratio"):
        config["macs_ratio"] = args.macs_ratio
    t0 = time.perf_counter()
    try:
        fact = hsvkernels.decompose(weight, method, **config)
    except (ValueError, TypeError, NotImplementedError) as exc:   # the method refuses this configuration
        return config, None, "%s: %s" % (type(exc).__name__, exc), None
    return config, fact, None, time.perf_counter() - t0


# Which aten conv backend runs ----------------------------------------------------------------

def conv_backend(x, w, stride, padding, dilation, groups=1):
    """The ATen convolution backend (Mkldnn, Slow2d, Cudnn, ...) chosen for these arguments."""
    try:
        b = torch._C._select_conv_backend(x, w, None, list(stride), list(padding), list(dilation), False, [0, 0],
                                          groups)
        return str(b).rsplit(".", 1)[-1]
    except Exception:   # private API; a missing or changed one must not stop a benchmark
        return "unknown"


class _ConvBackends(TorchFunctionMode):
    """Records the backend of every conv2d a Python-level chain calls.

    A function mode, not a dispatch mode: entering a dispatch mode imports
    torch._dynamo, which costs seconds.
    """

    ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

    def __init__(self):
        super().__init__()
        self.backends = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            a = dict(self.DEFAULTS, **dict(zip(self.ARGS, args)), **kwargs)
            self.backends.append(conv_backend(a["input"], a["weight"], _pair(a["stride"]), _pair(a["padding"]),
                                              _pair(a["dilation"]), a["groups"]))
        return func(*args, **kwargs)


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def chain_backends(fn):
    try:
        with _ConvBackends() as mode:
            fn()
        return mode.backends
    except Exception:
        return ["unknown"]


# Correctness gate -------------------------------------------------------------------------

def normalized_error(y, expected):
    y, expected = y.float(), expected.float()
    return ((y - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def exact_output(x, fact, kw):
    """F.conv2d on the reconstructed weight in fp32 with TF32 off: the result every path must match."""
    w = fact.to_dense().to(device=x.device, dtype=torch.float32)
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=False,
                                    allow_tf32=False):
        return F.conv2d(x.float(), w, None, **kw)


def tolerance(dtype, device):
    if dtype == torch.float32 and device.type == "cuda" and (torch.backends.cudnn.allow_tf32
                                                             or torch.backends.cuda.matmul.allow_tf32):
        return TOLERANCE_TF32
    return TOLERANCE[dtype]


# One layer --------------------------------------------------------------------------------

def ratio(a, b):
    return a / b if a and b else None


def graphed(fn, reps=1, after_warmup=None):
    """fn captured `reps` times into one CUDA graph (hsvkernels._timing.capture_graph); returns its replay.

    The op reads HSV_CUDA_IMPL when it is called, so each --impls callable is
    captured with its own implementation.
    """
    return capture_graph(fn, reps, after_warmup)[0]


def impl_variable(device):
    """The environment variable that picks the op's implementation on this device."""
    return "HSV_CUDA_IMPL" if device.type == "cuda" else "HSV_CPU_IMPL"


def with_env(fn, var, value):
    """fn run with os.environ[var] = value (None: unset); the extension reads it on every call.

    Set before every call and not restored, so every timed op callable sets its
    own: the cost (a putenv, about a microsecond) is the same for all of them.
    """
    if value is None:
        def call():
            os.environ.pop(var, None)
            return fn()
    else:
        def call():
            os.environ[var] = value
            return fn()
    return call


def fused_launch_count():
    """The extension's count of fused CUDA kernel launches (None without it)."""
    c = getattr(hsvkernels._extension, "_C", None)
    return c.cuda_fused_launch_count() if c is not None and hasattr(c, "cuda_fused_launch_count") else None


def bench_layer(shape, args, device, dtype, methods, layer_index):
    kw = shape.conv_kwargs()
    g = torch.Generator().manual_seed(args.seed * 1000 + layer_index)
    # a random, He-scaled dense weight: the layer before compression
    weight = torch.randn(shape.weight_shape, generator=g) * math.sqrt(2.0 / (shape.cin * shape.kh * shape.kw))
    decomposed = {m: decompose(weight, m, args) for m in methods}
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    w_dense = weight.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
    ho, wo = shape.out_hw
    impl_var, env_impl = impl_variable(device), args.env_impl
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, shape.cin, shape.h, shape.w, generator=g).to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=memory_format)
        fns = {"dense": lambda: F.conv2d(x, w_dense, None, **kw)}
        per_method = {}
        for method in methods:
            config, fact, refusal, seconds = decomposed[method]
            row = dict(shape.as_dict(), batch=batch, method=method, config=config, kind=None, status="ok",
                       message=None, decompose_s=seconds)
            per_method[method] = row
            rows.append(row)
            if fact is None:
                row.update(status="refused", message=refusal)
                continue
            f = fact.to(device=device, dtype=dtype)
            factors, kind = list(f.factors), f.kind
            row.update(kind=kind, factor_shapes=[list(t.shape) for t in factors], meta=jsonable(fact.meta),
                       params_dense=shape.dense_params, params_fact=fact.num_params(),
                       macs_dense=shape.dense_macs(batch), macs_fact=batch * fact.macs(ho, wo, shape.h, shape.w))
            row["params_ratio"] = row["params_dense"] / row["params_fact"]
            row["macs_ratio"] = row["macs_dense"] / row["macs_fact"]
            # compulsory traffic: input, weight (factors) and output, each moved once
            io_elems = x.numel() + batch * shape.cout * ho * wo
            row["bytes_dense"] = x.element_size() * (io_elems + w_dense.numel())
            row["bytes_fact"] = x.element_size() * (io_elems + sum(t.numel() for t in factors))

            def op_call(factors=factors, kind=kind, impl="composite" if args.fused else None):
                with cpu_impl(impl):
                    return torch.ops.hsv.conv2d(x, factors, None, kw["stride"], kw["padding"], kw["dilation"],
                                                kw["groups"], kind)

            def fused(factors=factors, kind=kind):
                with cpu_impl("fused"):
                    return torch.ops.hsv.conv2d(x, factors, None, kw["stride"], kw["padding"], kw["dilation"],
                                                kw["groups"], kind)

            # with --impls every op callable sets the variable: "op" back to the environment's own value
            op = with_env(op_call, impl_var, env_impl) if args.impls else op_call
            impl_ops = {impl: with_env(op_call, impl_var, impl) for impl in args.impls}

            def ref(f=f):
                return hsvkernels.reference.conv2d(x, f, None, kw["stride"], kw["padding"], kw["dilation"],
                                                   kw["groups"])

            try:   # the gate: both factorized paths against dense on the reconstructed weight
                with torch.inference_mode():
                    expected = exact_output(x, f, kw)
                    y_op, y_ref = op(), ref()
                    errors = {"op": normalized_error(y_op, expected), "reference": normalized_error(y_ref, expected)}
                    if args.fused:
                        errors["fused"] = normalized_error(fused(), expected)
                    row["out_channels_last"] = bool(y_op.is_contiguous(memory_format=torch.channels_last)
                                                    and not y_op.is_contiguous())
                    row["backends"] = {"dense": conv_backend(x, w_dense, **kw),
                                       "reference": chain_backends(ref)}
                    row["fused_ran"] = {}
                    for impl, fn in impl_ops.items():
                        # the counter counts fused CUDA launches only: no verdict on CPU
                        before = fused_launch_count() if device.type == "cuda" else None
                        errors["op:" + impl] = normalized_error(fn(), expected)
                        row["fused_ran"][impl] = None if before is None else fused_launch_count() > before
            except Exception as exc:   # the op cannot run this case (device, dtype, kind not built)
                row.update(status="error", message="%s: %s" % (type(exc).__name__, exc))
                continue
            tol = tolerance(dtype, device)
            row["check"] = dict(errors, tolerance=tol)
            bad = {k: e for k, e in errors.items() if not e <= tol}
            if bad:
                raise RuntimeError("layers.py: WRONG OUTPUT for %s batch %d method %s (kind %s, %s %s): normalized "
                                   "max error %s > tolerance %g against dense on the reconstructed weight"
                                   % (shape.name, batch, method, kind, device, args.dtype, bad, tol))
            fns["op:" + method] = op
            fns["reference:" + method] = ref
            for impl, fn in impl_ops.items():
                fns["impl:%s:%s" % (impl, method)] = fn
            if args.fused:
                fns["fused:" + method] = fused
        with torch.inference_mode():
            if args.graph and device.type == "cuda":
                fns = {name: graphed(fn) for name, fn in fns.items()}
            times = timing.time_interleaved(fns, min_run_time=args.min_run_time, rounds=args.rounds,
                                            min_blocks=args.min_blocks)
        for method, row in per_method.items():
            row["time"] = {"dense": times["dense"], "op": times.get("op:" + method),
                           "reference": times.get("reference:" + method), "fused": times.get("fused:" + method)}
            t_dense = times["dense"]["median"]
            t_op = (times.get("op:" + method) or {}).get("median")
            t_ref = (times.get("reference:" + method) or {}).get("median")
            t_impls = {impl: times.get("impl:%s:%s" % (impl, method)) for impl in args.impls}
            row["time_impls"] = t_impls
            t_impl = {impl: (t or {}).get("median") for impl, t in t_impls.items()}
            row["ratio_impls_dense"] = {impl: ratio(t, t_dense) for impl, t in t_impl.items()}
            if len(args.impls) >= 2:   # e.g. fused / composite, measured in this process
                row["ratio_impl_last_first"] = ratio(t_impl[args.impls[-1]], t_impl[args.impls[0]])
            row.update(ratio_op_dense=ratio(t_op, t_dense), ratio_ref_dense=ratio(t_ref, t_dense),
                       ratio_op_ref=ratio(t_op, t_ref),
                       gflops_dense=2 * shape.dense_macs(batch) / t_dense / 1e9,
                       gflops_op=2 * row["macs_fact"] / t_op / 1e9 if t_op else None,
                       gflops_ref=2 * row["macs_fact"] / t_ref / 1e9 if t_ref else None)
            if args.fused:
                t_fused = (times.get("fused:" + method) or {}).get("median")
                row.update(ratio_fused_dense=ratio(t_fused, t_dense), ratio_fused_op=ratio(t_fused, t_op),
                           gflops_fused=2 * row["macs_fact"] / t_fused / 1e9 if t_fused else None)
                if args.peak_gflops:
                    row["peak_share_dense"] = row["gflops_dense"] / args.peak_gflops
                    row["peak_share_fused"] = ratio(row["gflops_fused"], args.peak_gflops)
                    row["peak_share_op"] = ratio(row["gflops_op"], args.peak_gflops)
            if args.ceilings:
                row["roofline"] = roofline_of(row, args.ceilings)
            print_row(row, args.fused)
    return rows


def roofline_of(row, ceil):
    """Each timed path of a row against the ceilings: the dense conv with its own MACs and bytes, the rest
    with the factorization's."""
    t = row.get("time") or {}
    paths = {k: (t.get(k) or {}).get("median") for k in ("dense", "op", "reference", "fused")}
    paths.update({"impl:" + impl: (v or {}).get("median") for impl, v in (row.get("time_impls") or {}).items()})
    out = {}
    for name, seconds in paths.items():
        if seconds:
            flops, nbytes = ((2 * row["macs_dense"], row["bytes_dense"]) if name == "dense"
                             else (2 * row["macs_fact"], row["bytes_fact"]))
            out[name] = ceilings.roofline(flops, nbytes, seconds, ceil)
    return out


@contextlib.contextmanager
def cpu_impl(impl):
    """HSV_CPU_IMPL set to impl for the duration (None: leave it alone); the op reads it on every call."""
    if impl is None:
        yield
        return
    saved = os.environ.get("HSV_CPU_IMPL")
    os.environ["HSV_CPU_IMPL"] = impl
    try:
        yield
    finally:
        if saved is None:
            del os.environ["HSV_CPU_IMPL"]
        else:
            os.environ["HSV_CPU_IMPL"] = saved


# Output -----------------------------------------------------------------------------------

def fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return "%.1f us" % (s * 1e6)
    if s < 1.0:
        return "%.2f ms" % (s * 1e3)
    return "%.3f s" % s


def fmt(v, spec="%.3f"):
    return "-" if v is None else spec % v


def ranks_of(row):
    meta = row.get("meta") or {}
    keys = [k for k in ("ranks", "rank") if k in meta] or sorted(k for k in meta if "rank" in k)
    return ";".join(str(meta[k]).replace(" ", "") for k in keys) or "-"


def jsonable(value):
    """meta values as JSON: small tensors as lists, big ones as a shape note."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else "tensor%s" % (list(value.shape),)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


COLUMNS = ("layer", "N", "method", "kind", "ranks", "params x", "MACs x", "dense", "op", "reference",
           "op/dense", "ref/dense", "op/ref", "GFLOP/s dense", "GFLOP/s op", "GFLOP/s ref", "note")
_WIDTHS = (30, 4, 9, 9, 9, 8, 7, 10, 10, 10, 8, 9, 7, 13, 10, 11, 0)


FUSED_COLUMNS = ("fused", "fused/dense", "fused/op", "GFLOP/s fused", "%peak dense", "%peak op", "%peak fused")
_FUSED_WIDTHS = (10, 11, 8, 13, 11, 8, 11)


def columns(fused):
    """Column names and widths; with --fused the fused columns go before the note."""
    if not fused:
        return COLUMNS, _WIDTHS
    return COLUMNS[:-1] + FUSED_COLUMNS + COLUMNS[-1:], _WIDTHS[:-1] + _FUSED_WIDTHS + _WIDTHS[-1:]


def fused_cells(row):
    t = (row.get("time") or {}).get("fused") or {}
    pct = (lambda v: "-" if v is None else "%.0f%%" % (100 * v))
    return [fmt_time(t.get("median")), fmt(row.get("ratio_fused_dense")), fmt(row.get("ratio_fused_op")),
            fmt(row.get("gflops_fused"), "%.1f"), pct(row.get("peak_share_dense")), pct(row.get("peak_share_op")),
            pct(row.get("peak_share_fused"))]


def row_cells(row, fused=False):
    cells = _base_cells(row)
    if fused:
        cells = cells[:-1] + fused_cells(row) + cells[-1:]
    return cells


def _base_cells(row):
    t = row.get("time") or {}
    med = {k: (t.get(k) or {}).get("median") for k in ("dense", "op", "reference")}
    if row["status"] != "ok":
        return [row["layer"], str(row["batch"]), row["method"], "-", "-", "-", "-", fmt_time(med["dense"]), "-",
                "-", "-", "-", "-", fmt(row.get("gflops_dense"), "%.1f"), "-", "-",
                "%s: %s" % (row["status"].upper(), (row["message"] or "")[:100])]
    return [row["layer"], str(row["batch"]), row["method"], row["kind"], ranks_of(row),
            fmt(row["params_ratio"], "%.2f"), fmt(row["macs_ratio"], "%.2f"), fmt_time(med["dense"]),
            fmt_time(med["op"]), fmt_time(med["reference"]), fmt(row["ratio_op_dense"]),
            fmt(row["ratio_ref_dense"]), fmt(row["ratio_op_ref"]), fmt(row["gflops_dense"], "%.1f"),
            fmt(row["gflops_op"], "%.1f"), fmt(row["gflops_ref"], "%.1f"), impl_note(row)]


def impl_note(row):
    """--impls: each implementation's time / dense (with '(fallback)' where no fused kernel ran), and last/first."""
    ratios = row.get("ratio_impls_dense") or {}
    ran = row.get("fused_ran") or {}
    parts = ["%s/dense %s%s" % (impl, fmt(r), " (fallback)" if impl == "fused" and ran.get(impl) is False else "")
             for impl, r in ratios.items()]
    impls = list(ratios)
    if len(impls) >= 2:
        parts.append("%s/%s %s" % (impls[-1], impls[0], fmt(row.get("ratio_impl_last_first"))))
    return ", ".join(parts)


def print_header(fused=False):
    cols, widths = columns(fused)
    print(" ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(), flush=True)


def print_row(row, fused=False):
    _, widths = columns(fused)
    print(" ".join(c.ljust(w) for c, w in zip(row_cells(row, fused), widths)).rstrip(), flush=True)


def geomean(values):
    values = [v for v in values if v and math.isfinite(v) and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(rows):
    """Geometric means of the time ratios per (method, batch) over the layers that ran."""
    out = []
    for method in sorted({r["method"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows}):
            ok = [r for r in rows if r["method"] == method and r["batch"] == batch and r["status"] == "ok"]
            if ok:
                s = {"method": method, "batch": batch, "layers": len(ok),
                     "geomean_op_dense": geomean(r["ratio_op_dense"] for r in ok),
                     "geomean_ref_dense": geomean(r["ratio_ref_dense"] for r in ok),
                     "geomean_op_ref": geomean(r["ratio_op_ref"] for r in ok)}
                impls = list(ok[0].get("ratio_impls_dense") or {})
                for impl in impls:
                    s["geomean_%s_dense" % impl] = geomean(r["ratio_impls_dense"][impl] for r in ok)
                if len(impls) >= 2:
                    s["geomean_%s_%s" % (impls[-1], impls[0])] = geomean(r.get("ratio_impl_last_first") for r in ok)
                if any(r.get("ratio_fused_dense") is not None for r in ok):
                    s["geomean_fused_dense"] = geomean(r.get("ratio_fused_dense") for r in ok)
                    s["geomean_fused_op"] = geomean(r.get("ratio_fused_op") for r in ok)
                out.append(s)
    return out


def markdown(result):
    env, settings = result["env"], result["settings"]
    lines = ["# hsvkernels layer benchmark: %s %s" % (settings["device"], settings["dtype"]), ""]
    lines += ["    " + line for line in timing.describe_environment(env)]
    lines += ["", "Settings: batch %s, channels_last %s, ratio %g, macs_ratio %g, timing %gs in %d rounds "
              "(at least %d blocks) per callable%s." % (settings["batch"], settings["channels_last"], settings["ratio"],
                                                       settings["macs_ratio"], settings["min_run_time"],
                                                       settings["rounds"], settings["min_blocks"],
                                                       ", CUDA-graph replays" if settings.get("graph") else ""),
              "Times are medians per call; ratios < 1 mean the first is faster. See bench/README.md.", ""]
    fused = settings.get("fused", False)
    if fused:
        lines += ["Fused: op is the composite chain (HSV_CPU_IMPL=composite), fused the hand-written kernels "
                  "(HSV_CPU_IMPL=fused, ISA %s). Peak: %s GFLOP/s = measured single-core FMA peak %s GFLOP/s x %d "
                  "threads (bench/peak.py); %%peak uses dense MACs for dense and factorized MACs for op and fused "
                  "(so fused/op <= x needs %%peak fused >= %%peak op / x)."
                  % (settings.get("fused_isa"), fmt(settings.get("peak_gflops"), "%.1f"),
                     fmt(settings.get("core_peak_gflops"), "%.1f"), env["threads"]), ""]
    backends = sorted({(r.get("backends") or {}).get("dense") for r in result["rows"]} - {None})
    lines += ["Dense F.conv2d backend(s) (torch._C._select_conv_backend): %s; torch.backends.mkldnn available=%s "
              "enabled=%s." % (", ".join(backends) or "-", env["mkldnn_available"], env["mkldnn_enabled"]), ""]
    cols, _ = columns(fused)
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for row in result["rows"]:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row_cells(row, fused)) + " |")
    if settings.get("ceilings"):
        lines += roofline_markdown(result)
    if result["summary"]:
        lines += ["", "Geometric means over the layers that ran:", "",
                  "| method | N | layers | op/dense | ref/dense | op/ref | fused/dense | fused/op |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in result["summary"]:
            lines.append("| %s | %d | %d | %s | %s | %s | %s | %s |" % (
                s["method"], s["batch"], s["layers"], fmt(s["geomean_op_dense"]), fmt(s["geomean_ref_dense"]),
                fmt(s["geomean_op_ref"]), fmt(s.get("geomean_fused_dense")), fmt(s.get("geomean_fused_op"))))
    return "\n".join(lines) + "\n"


def roofline_markdown(result):
    ceil = result["settings"]["ceilings"]
    lines = ["", "Roofline: " + ceilings.describe(ceil) + ". TFLOP/s count 2 x MACs (dense MACs for dense, the "
             "factorization's for the rest); GB/s count the compulsory traffic (input, weights or factors, output, "
             "each once), so a chain's intermediates are not in them; bound = max(FLOPs / matmul ceiling, bytes / "
             "copy ceiling); roofline = bound / time (1.00 = at the roofline).", "",
             "| layer | N | method | path | time | TFLOP/s | GB/s | % matmul | % copy | bound | roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for path, r in (row.get("roofline") or {}).items():
            lines.append("| %s | %d | %s | %s | %s | %.2f | %.1f | %.0f%% | %.0f%% | %s | %.2f |" % (
                row["layer"], row["batch"], row["method"], path, fmt_time(r["bound_s"] / r["roofline_share"]),
                r["tflops"], r["gbps"], 100 * r["compute_share"], 100 * r["memory_share"], fmt_time(r["bound_s"]),
                r["roofline_share"]))
    return lines


def default_out(args):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = "layers-%s-%s%s" % (args.device.replace(":", ""), stamp, "-quick" if args.quick else "")
    return os.path.join(_ROOT, "bench", "results", name)


def setup_backends(args, device):
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # the fair dense baseline: cuDNN picks its best algorithm per shape
        if args.tf32 != "default":
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"


def main(argv=None):
    args = parse_args(argv)
    _host_malloc.configure(args.host_malloc)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("layers.py: --device %s but CUDA is not available" % args.device)
    setup_backends(args, device)
    # the implementation the environment selects, before --impls callables start setting it
    args.env_impl = os.environ.get(impl_variable(device))
    methods = args.methods or sorted(hsvkernels.METHODS)
    unknown = [m for m in methods if m not in hsvkernels.METHODS]
    if unknown:
        raise SystemExit("layers.py: unknown method(s) %s; hsvkernels.METHODS has %s"
                         % (unknown, sorted(hsvkernels.METHODS)))
    layers = select_layers(args)
    args.ceilings = None
    if args.roofline == "on" or (args.roofline == "auto" and device.type == "cuda"):
        args.ceilings = ceilings.measure(device, dtype, args.ceiling_seconds)
        print(ceilings.describe(args.ceilings), flush=True)
    args.peak_gflops = args.core_peak_gflops = args.fused_isa = None
    if args.fused:
        if device.type != "cpu":
            raise SystemExit("layers.py: --fused times the CPU kernels; use --device cpu")
        if args.impls:  # both would set HSV_CPU_IMPL around the same calls
            raise SystemExit("layers.py: give --fused or --impls on CPU, not both")
        from bench import peak
        isas = peak.runnable_isas()
        if isas:
            args.fused_isa = os.environ.get("HSV_CPU_ISA") or isas[0]
            args.core_peak_gflops = peak.fma_peaks(args.peak_seconds)[args.fused_isa]
            args.peak_gflops = args.core_peak_gflops * torch.get_num_threads()
            print("measured fp32 FMA peak (%s): %.1f GFLOP/s per core x %d threads = %.1f GFLOP/s"
                  % (args.fused_isa, args.core_peak_gflops, torch.get_num_threads(), args.peak_gflops))
    env = timing.environment(args.device)
    for line in timing.describe_environment(env):
        print(line)
    print("device %s  dtype %s  channels_last %s  batch %s  methods %s  layers %d  timing %gs in %d rounds, "
          ">= %d blocks%s" % (device, args.dtype, args.channels_last, args.batch, ",".join(methods), len(layers),
                              args.min_run_time, args.rounds, args.min_blocks,
                              "  CUDA-graph replays" if args.graph and device.type == "cuda" else ""), flush=True)
    print_header(args.fused)
    rows = []
    for i, shape in enumerate(layers):
        rows.extend(bench_layer(shape, args, device, dtype, methods, i))
    settings = {k: v for k, v in vars(args).items() if k != "shape"}
    settings["shape"] = [s.as_dict() for s in args.shape]
    settings["methods"] = methods
    result = {"schema": "hsvkernels-bench-layers/1", "env": env, "settings": settings, "rows": rows,
              "summary": summarize(rows)}
    for s in result["summary"]:
        extra = "".join("  %s %s" % (k[len("geomean_"):].replace("_", "/"), fmt(v)) for k, v in s.items()
                        if k.startswith("geomean_") and k not in ("geomean_op_dense", "geomean_ref_dense",
                                                                   "geomean_op_ref"))
        print("geomean %-9s N=%-4d over %d layers: op/dense %s  ref/dense %s  op/ref %s%s"
              % (s["method"], s["batch"], s["layers"], fmt(s["geomean_op_dense"]), fmt(s["geomean_ref_dense"]),
                 fmt(s["geomean_op_ref"]), extra))
    out = args.out or default_out(args)
    out = out[:-5] if out.endswith(".json") else out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(out + ".md", "w") as f:
        f.write(markdown(result))
    print("wrote %s.json and %s.md" % (out, out))
    if args.impls:   # leave the variable as the environment had it
        with_env(lambda: None, impl_variable(device), args.env_impl)()
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        print("layers.py: %d configuration(s) failed to run; see 'message' in the JSON" % len(errors),
              file=sys.stderr)
    return result


if __name__ == "__main__":
    # a configuration the op could not run is a failure, even though the others still ran
    sys.exit(1 if any(r["status"] == "error" for r in main()["rows"]) else 0)
