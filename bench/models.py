"""End-to-end latency: torchvision ResNet-18/50 and VGG-16, dense against converted, in one process.

Every conv with groups == 1 is converted with each method at --ratio (and
--macs-ratio for methods that take it); both models run the same input, timed in
interleaved rounds (hsvkernels.benchmark.time_pair), medians reported. Random
init (no downloads); latency does not depend on the weights' values.

    python bench/models.py --models resnet18,resnet50,vgg16 --methods svd,hsv --batch 1,8 \
        --out bench/results/models-cpu

--cpu-impl composite,fused times the converted model once per CPU
implementation of the op (HSV_CPU_IMPL, read by the op on every call), each
against a fresh dense timing in the same interleaved pair. An entry may set
other HSV_* variables for its run, e.g. --cpu-impl fused,fused+HSV_CPU_IM2COL_PANELS=off. On a GPU
(--device cuda, cuDNN autotuning on, TF32 as --tf32 says) --cuda-impl does the
same with HSV_CUDA_IMPL, and --dtype picks fp32, fp16 or bf16:

    python bench/models.py --device cuda --dtype bfloat16 --channels-last --batch 1,32 \
        --cuda-impl composite,fused,auto --out bench/results/models-cuda-bf16

--fold-bn folds BatchNorms first (in both models), --fuse-epilogues adds rows with the
residual adds and ReLUs fused into the op, --compile rows with both models
through torch.compile and --aoti rows with both as AOTInductor packages: how a
deployment that compiles would compare them.
"""
import argparse
import copy
import inspect
import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hsvkernels  # noqa: E402
from hsvkernels import _host_malloc  # noqa: E402
from bench import ceilings, timing  # noqa: E402
from bench.layers import normalized_error  # noqa: E402
from hsvkernels import benchmark, convert, models, ranks  # noqa: E402
from hsvkernels._timing import capture_graph  # noqa: E402
from hsvkernels.fold import fold_batch_norms_  # noqa: E402
from hsvkernels.epilogue import fuse_epilogues  # noqa: E402


def fuse_or_exit(model, name):
    """fuse_epilogues(model), or exit with its one-line reason (a model torch.fx cannot trace)."""
    try:
        return fuse_epilogues(model)
    except RuntimeError as exc:
        raise SystemExit("%s: --fuse-epilogues on %s: %s" % (os.path.basename(sys.argv[0]), name, exc)) from None


def to_format(model, fmt):
    """The model with its 4-D tensors in memory format fmt; others (e.g. 5-D hsv factors) as they are: the
    layout these benchmarks have always timed. (model.to(memory_format=) works on converted models too, and
    gives 5-D factors the format's strides through a 4-D view; the fused kernels pack factors either way.)"""
    return model._apply(lambda t: t.contiguous(memory_format=fmt) if t.dim() == 4 else t)


class Graphed:
    """model(x) captured in a CUDA graph for one static input; calling it replays the graph
    (x must be that input). Under graphs the host's launch overhead is gone, so the times are the
    device's: how a deployment at small batch runs (torch.compile(mode="reduce-overhead"), CUDA graphs)."""

    def __init__(self, model, x):
        self.x = x
        with torch.inference_mode():
            self.replay, self.y = capture_graph(lambda: model(x))

    def __call__(self, x):
        assert x is self.x, "a Graphed model replays for the input it was captured with"
        self.replay()
        return self.y


def impl_entry(impl):
    """The --cpu-impl/--cuda-impl entry a row's impl came from: without its +epilogues, +compile or +aoti
    suffix."""
    for suffix in ("+epilogues", "+compile", "+aoti"):
        if impl.endswith(suffix):
            return impl[:-len(suffix)]
    return impl


def aoti_package(model, x, path):
    """model exported at x's shape and built into an AOTInductor package at path, loaded: a callable that
    runs it. The package keeps hsv::conv2d as a call through the dispatcher (tests/test_aoti.py)."""
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        return torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(program,
                                                                                           package_path=path))


def check_compiled(compiled, eager, x, grad_mode):
    """Each compiled model's output on x against its eager model's, before either is timed: a compiled
    graph that computes something else would make its timing meaningless."""
    with benchmark.GRAD_MODES[grad_mode]():
        for c, e in zip(compiled, eager):
            err = normalized_error(c(x), e(x))
            if not err <= 1e-2:
                raise SystemExit("models.py: the compiled model's output is off from the eager one's by %.3g "
                                 "(relative to its largest value)" % err)


def write_h2h(f, rows, key, title, columns):
    """A markdown table of the rows that have a head-to-head result under `key`: model, method, batch, impl,
    then one column per (name, format(result)) in `columns`."""
    rows = [r for r in rows if r.get(key)]
    if not rows:
        return
    f.write("\n%s, timed against each other in one time_pair\n\n| model | method | batch | impl | %s |\n|%s\n"
            % (title, " | ".join(columns), "---|" * (4 + len(columns))))
    for r in rows:
        f.write("| %s | %s | %d | %s | %s |\n" % (r["model"], r["method"], r["batch"], r["impl"],
                                                 " | ".join(fmt(r[key]) for fmt in columns.values())))


def add_model_arguments(ap, methods):
    """The arguments every whole-model benchmark takes: which models and methods, the targets, sizes, threads."""
    ap.add_argument("--models", default="resnet18,resnet50,vgg16")
    ap.add_argument("--methods", default=methods)
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--macs-ratio", type=float, default=4.0, help="for methods that take it (0: never)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per model (or callable) and "
                                                                      "batch")


def method_options(method, ratio, macs_ratio):
    """convert_ options for the --ratio and --macs-ratio targets (macs_ratio only where the method takes it)."""
    options = {"ratio": ratio}
    if macs_ratio and "macs_ratio" in inspect.signature(hsvkernels.METHODS[method]).parameters:
        options["macs_ratio"] = macs_ratio
    return options


def impl_settings(impl_var, entry, allowed):
    """The environment one --cpu-impl/--cuda-impl entry runs under: "fused" -> {impl_var: "fused"},
    "fused+HSV_X=off" -> also HSV_X=off. Only HSV_* variables, each NAME=VALUE."""
    impl, *extra = entry.split("+")
    if impl not in allowed:
        raise SystemExit("models.py: %s value %r: must be one of %s" % (impl_var, impl, allowed))
    env = {impl_var: impl}
    for item in extra:
        name, eq, value = item.partition("=")
        if not (eq and name.startswith("HSV_") and value):
            raise SystemExit("models.py: %r in %r: expected +HSV_NAME=VALUE" % (item, entry))
        env[name] = value
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap, "svd,hsv")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cpu-impl", default="fused",
                    help="comma list of HSV_CPU_IMPL values to time the converted model under (composite,fused,auto; "
                         "default: fused, the op's CPU default); an entry may add +HSV_NAME=VALUE settings")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--cuda-impl", default="auto",
                    help="comma list of HSV_CUDA_IMPL values to time the converted model under (composite,fused,auto; "
                         "default: auto, the op's CUDA default, which with cudnn.benchmark on keeps the faster of "
                         "fused and composite per layer)")
    ap.add_argument("--measure", action="store_true",
                    help="convert with measure=True: each layer timed dense vs factorized on the device (on an input "
                         "of the largest --batch), the faster kept")
    ap.add_argument("--graph", action="store_true",
                    help="CUDA only: time replays of each whole model captured in a CUDA graph (no host overhead)")
    ap.add_argument("--aa", action="store_true",
                    help="also time the dense model against a copy of itself (an A/A row: the method's own bias)")
    ap.add_argument("--grad-mode", default="inference_mode", choices=sorted(benchmark.GRAD_MODES),
                    help="the context both models run under")
    ap.add_argument("--fold-bn", action="store_true",
                    help="fold BatchNorms into their convs in the dense model before converting (both models then run "
                         "without BN passes)")
    ap.add_argument("--fuse-epilogues", action="store_true",
                    help="also time each converted model with its convs' residual adds and ReLUs fused into the op "
                         "(hsvkernels.epilogue.fuse_epilogues): rows IMPL+epilogues")
    ap.add_argument("--compile", action="store_true",
                    help="also time both models through torch.compile (Inductor, dynamic=False; compiled during "
                         "warm-up, so compile time is not timed): rows IMPL+compile, compiled compressed against "
                         "compiled dense; each compiled model's output is checked against its eager one first")
    ap.add_argument("--aoti", action="store_true",
                    help="also time both models as AOTInductor packages (torch.export at each batch's shape, "
                         "torch._inductor.aoti_compile_and_package; build time not timed): rows IMPL+aoti, checked "
                         "against eager first as with --compile")
    ap.add_argument("--tf32", default="on", choices=["on", "off"], help="TF32 for cuDNN and cuBLAS (fp32 on CUDA)")
    ap.add_argument("--latency-ratio", type=float, default=None,
                    help="choose each layer's config by hsvkernels.ranks.select under this measured latency budget "
                         "(summed layer latency / dense), with --ratio as the parameter budget; layers timed on the "
                         "device, in the dtype, layout and largest batch of the run")
    ap.add_argument("--latency-points", type=int, default=4, help="with --latency-ratio: options timed per layer")
    ap.add_argument("--roofline", choices=["auto", "on", "off"], default="auto",
                    help="measure the device's matmul ceiling (bench/ceilings.py) and give each model's conv TFLOP/s "
                         "as a share of it; auto: on CUDA only")
    ap.add_argument("--out", default=None, help="path without extension for .json and .md")
    _host_malloc.add_argument(ap)
    args = ap.parse_args(argv)
    _host_malloc.configure(args.host_malloc)
    cuda = args.device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("models.py: --device cuda but torch sees no CUDA device")
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    if args.graph and (args.compile or args.aoti):
        raise SystemExit("models.py: --compile/--aoti and --graph time different things (compiled calls, graph "
                         "replays); give one")
    if args.graph and not cuda:
        raise SystemExit("models.py: --graph needs --device cuda")
    dtype = getattr(torch, args.dtype)
    if not cuda and dtype != torch.float32:
        raise SystemExit("models.py: --dtype %s is for --device cuda; the CPU runs fp32" % args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    env = timing.environment(args.device)
    head = timing.describe_environment(env)
    for line in head:
        print(line)
    impl_var, impl_arg, allowed = (("HSV_CUDA_IMPL", args.cuda_impl, ("composite", "fused", "auto")) if cuda else
                                   ("HSV_CPU_IMPL", args.cpu_impl, ("composite", "fused", "auto")))
    impls = [i for i in impl_arg.split(",") if i]
    settings = {i: impl_settings(impl_var, i, allowed) for i in impls}
    ceil = None
    if args.roofline == "on" or (args.roofline == "auto" and cuda):
        ceil = ceilings.measure(args.device, dtype)
        print(ceilings.describe(ceil), flush=True)
    rows = []
    print("%s, threads %d, %s, %s, ratio %g, macs_ratio %g, %s %s"
          % (args.device, torch.get_num_threads(), args.dtype, fmt, args.ratio, args.macs_ratio, impl_var,
             ",".join(impls)))
    # AOTInductor packages (--aoti) live here until the process ends
    tmp = tempfile.mkdtemp(prefix="hsv-aoti-") if args.aoti else None
    for name in args.models.split(","):
        torch.manual_seed(0)
        dense = models.build("torchvision:" + name).eval()
        folds = len(fold_batch_norms_(dense)) if args.fold_bn else 0
        example = torch.randn(1, 3, args.input_size, args.input_size)
        for method in args.methods.split(","):
            options = method_options(method, args.ratio, args.macs_ratio)
            compressed = copy.deepcopy(dense)
            if args.measure or args.latency_ratio:  # layers timed where they will run: device, dtype, layout, batch
                compressed = to_format(compressed.to(args.device, dtype), fmt)
                example = torch.randn(max(int(b) for b in args.batch.split(",")), 3, args.input_size,
                                      args.input_size, device=args.device, dtype=dtype).contiguous(memory_format=fmt)
            plan = None
            if args.latency_ratio:
                try:
                    plan = ranks.select(compressed, method, ratio=args.ratio, latency_ratio=args.latency_ratio,
                                        example_input=example, latency_points=args.latency_points, progress=False)
                except ValueError as exc:   # out of reach on this device: say so, go on with the next
                    print("%s %s: no plan for latency_ratio %g with ratio %g: %s"
                          % (name, method, args.latency_ratio, args.ratio, exc), flush=True)
                    continue
                options = {"ranks": plan}
                print("%s %s: plan for latency_ratio %g: %.2fx measured layer latency, %.2fx params, %.2fx MACs"
                      % (name, method, args.latency_ratio, plan.latency_reduction(), plan.compression(),
                         plan.mac_reduction()), flush=True)
            report = convert.convert_(compressed, method, example_input=example, progress=False, decompose_threads=1,
                                      measure=args.measure, **options)
            factorized = len(report.factorized)
            # with --measure: each layer's timings and decision, to see which layers the factorization wins
            measured = [dict(name=r.name, shape=list(r.shape), decision=r.decision, reason=r.reason,
                             dense_ms=r.latency_dense_ms, factorized_ms=r.latency_factorized_ms)
                        for r in report.layers if r.latency_dense_ms is not None] if args.measure else []
            params = sum(p.numel() for p in dense.parameters()) / sum(p.numel() for p in compressed.parameters())
            totals = report.totals()
            macs_x = totals["macs_before"] / totals["macs_after"]
            on_device = [to_format(m.to(args.device, dtype), fmt) for m in (copy.deepcopy(dense), compressed)]
            epilogues = fuse_or_exit(on_device[1], name) if args.fuse_epilogues else None
            compiled = [torch.compile(m, dynamic=False) for m in on_device] if args.compile else None
            print("%s %s: %d convs factorized%s%s" % (name, method, factorized,
                                                      ", the rest kept dense (measured slower or not eligible)"
                                                      if args.measure else "",
                                                      ", %d BatchNorms folded in both models" % folds
                                                      if args.fold_bn else ""), flush=True)
            for n in [int(b) for b in args.batch.split(",")]:
                x = torch.randn(n, 3, args.input_size, args.input_size, device=args.device,
                                dtype=dtype).contiguous(memory_format=fmt)
                runs = [(impl, on_device) for impl in impls]
                if epilogues is not None:
                    runs += [(impl + "+epilogues", [on_device[0], epilogues]) for impl in impls]
                ahead = {}  # ahead-of-time forms of both models, each timed against its eager pair
                if compiled is not None:
                    ahead["compile"] = compiled
                if args.aoti:
                    ahead["aoti"] = [aoti_package(m, x, os.path.join(tmp, "%s-%s-%d-%d.pt2" % (name, method, n, i)))
                                     for i, m in enumerate(on_device)]
                runs += [(impl + "+" + kind, pair) for kind, pair in ahead.items() for impl in impls]
                if args.aa:
                    runs.append(("A/A", [on_device[0], copy.deepcopy(on_device[0])]))
                for impl, pair in runs:
                    with timing.env_set(settings.get(impl_entry(impl), {})):
                        if impl.rpartition("+")[2] in ahead:
                            check_compiled(pair, on_device, x, args.grad_mode)
                        if args.graph:   # captured with this implementation (the op reads it at capture)
                            pair = [Graphed(m, x) for m in pair]
                        t = benchmark.time_pair(*pair, x, min_run_time=args.min_run_time, grad_mode=args.grad_mode)
                    aa = impl == "A/A"
                    row = dict(model=name, method=method,
                               options={"latency_ratio": args.latency_ratio, "ratio": args.ratio} if plan else options,
                               plan_latency_x=plan.latency_reduction() if plan else None, measure=args.measure,
                               factorized=0 if aa else factorized, bn_folded=folds,
                               batch=n, device=args.device, graph=args.graph,
                               dtype=args.dtype, grad_mode=args.grad_mode, impl_var=impl_var, impl=impl,
                               compiled=impl.rpartition("+")[2] if impl.rpartition("+")[2] in ahead else None,
                               model_params_x=1.0 if aa else params,
                               conv_macs_x=1.0 if aa else macs_x, **t)
                    # achieved conv TFLOP/s: the convs' MACs over the whole model's time (the rest of the model
                    # does little arithmetic but takes time, so this understates the convs' own rate)
                    macs_after = totals["macs_before"] if aa else totals["macs_after"]
                    row["conv_tflops_dense"] = 2 * totals["macs_before"] * n / t["dense_s"] / 1e12
                    row["conv_tflops_compressed"] = 2 * macs_after * n / t["compressed_s"] / 1e12
                    if ceil:
                        row["matmul_ceiling_tflops"] = ceil["tflops"]
                    if measured and not aa:
                        row["layers"] = measured
                    if impl.endswith("+epilogues"):  # head to head: the same compressed model, unfused and fused
                        with timing.env_set(settings.get(impl_entry(impl), {})):
                            h2h_pair = [on_device[1], epilogues]
                            if args.graph:  # as the rows above: each captured under this implementation
                                h2h_pair = [Graphed(m, x) for m in h2h_pair]
                            h2h = benchmark.time_pair(*h2h_pair, x, min_run_time=args.min_run_time,
                                                      grad_mode=args.grad_mode)
                        row["epilogues_h2h"] = dict(unfused_s=h2h["dense_s"], fused_s=h2h["compressed_s"],
                                                    ratio=h2h["ratio"])
                        print("%-9s %-5s N=%-3d %-9s head to head: unfused %9.2f ms  fused epilogues %9.2f ms  "
                              "ratio %.3f" % (name, method, n, impl, 1e3 * h2h["dense_s"], 1e3 * h2h["compressed_s"],
                                              h2h["ratio"]), flush=True)
                    kind = impl.rpartition("+")[2]
                    if kind in ahead:  # head to head: each model eager against itself compiled
                        with timing.env_set(settings.get(impl_entry(impl), {})):
                            row[kind + "_h2h"] = h2h = {
                                which: benchmark.time_pair(on_device[i], ahead[kind][i], x,
                                                           min_run_time=args.min_run_time,
                                                           grad_mode=args.grad_mode)["ratio"]
                                for i, which in enumerate(("dense", "compressed"))}
                        print("%-9s %-5s N=%-3d %-9s head to head: %s / eager, dense %.3f  compressed %.3f"
                              % (name, method, n, impl, kind, h2h["dense"], h2h["compressed"]), flush=True)
                    rows.append(row)
                    print("%-9s %-5s N=%-3d %-9s dense %9.2f ms  compressed %9.2f ms  ratio %.3f  "
                          "(params %.2fx, conv MACs %.2fx)"
                          % (name, method, n, impl, 1e3 * t["dense_s"], 1e3 * t["compressed_s"], t["ratio"],
                             row["model_params_x"],
                             row["conv_macs_x"]), flush=True)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"env": env, "ceilings": ceil, "rows": rows}, f, indent=1, default=str)
        with open(args.out + ".md", "w") as f:
            f.write("End to end, %s, %s, %d threads, %s, input %d, under torch.%s%s%s. Command: `%s`\n\n```\n"
                    "%s\n```\n\n"
                    % (args.device, args.dtype, torch.get_num_threads(),
                       "channels_last" if args.channels_last else "NCHW", args.input_size, args.grad_mode,
                       ", each model replayed from a CUDA graph" if args.graph else "",
                       ", BatchNorms folded into the convs in both models" if args.fold_bn else "",
                       " ".join(sys.argv), "\n".join(head)))
            if ceil:
                f.write(ceilings.describe(ceil) + ". Conv TFLOP/s: 2 x the convs' MACs per second of the whole "
                        "model's time; (% of matmul): that as a share of the matmul ceiling.\n\n")
            f.write("| model | method | batch | " + impl_var + " | dense ms | compressed ms | compressed / dense | "
                    "model params x | conv MACs x | convs factorized | conv TFLOP/s dense | conv TFLOP/s compressed"
                    " |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                share = ((lambda v: " (%.0f%%)" % (100 * v / ceil["tflops"])) if ceil else (lambda v: ""))
                f.write("| %s | %s | %d | %s | %.2f | %.2f | %.3f | %.2f | %.2f | %d%s | %.3f%s | %.3f%s |\n" % (
                    r["model"], r["method"], r["batch"], r["impl"], 1e3 * r["dense_s"], 1e3 * r["compressed_s"],
                    r["ratio"], r["model_params_x"], r["conv_macs_x"], r["factorized"],
                    " (measured)" if r["measure"] else "", r["conv_tflops_dense"], share(r["conv_tflops_dense"]),
                    r["conv_tflops_compressed"], share(r["conv_tflops_compressed"])))
            if args.compile:
                f.write("\nRows IMPL+compile: both models through torch.compile (Inductor, dynamic=False), "
                        "compiled during the warm-up calls; the ratio is compiled compressed / compiled dense.\n")
            if args.aoti:
                f.write("\nRows IMPL+aoti: both models exported at the batch's shape and built as AOTInductor "
                        "packages (not timed); the ratio is packaged compressed / packaged dense.\n")
            if args.aa:
                f.write("\nRows A/A: the dense model against a copy of itself; their distance from 1 is the "
                        "timing's own bias.\n")
            write_h2h(f, rows, "epilogues_h2h", "Epilogue fusion head to head (hsvkernels.fuse_epilogues): the "
                      "same compressed model unfused and fused",
                      {"unfused ms": lambda e: "%.2f" % (1e3 * e["unfused_s"]),
                       "fused epilogues ms": lambda e: "%.2f" % (1e3 * e["fused_s"]),
                       "fused / unfused": lambda e: "%.3f" % e["ratio"]})
            write_h2h(f, rows, "compile_h2h", "torch.compile head to head: each model eager against itself compiled",
                      {"dense: compiled / eager": lambda e: "%.3f" % e["dense"],
                       "compressed: compiled / eager": lambda e: "%.3f" % e["compressed"]})
            write_h2h(f, rows, "aoti_h2h", "AOTInductor head to head: each model eager against its package",
                      {"dense: package / eager": lambda e: "%.3f" % e["dense"],
                       "compressed: package / eager": lambda e: "%.3f" % e["compressed"]})
            timed = {(r["model"], r["method"]): r["layers"] for r in rows if r.get("layers")}
            for (model, method), layer_rows in timed.items():
                f.write("\n%s, %s: each layer timed by convert_(measure=True) on the example batch\n\n"
                        "| layer | shape | dense ms | factorized ms | factorized / dense | kept |\n"
                        "|---|---|---|---|---|---|\n" % (model, method))
                for lr in layer_rows:
                    f.write("| %s | %s | %.4f | %.4f | %.3f | %s |\n" % (
                        lr["name"], "x".join(str(d) for d in lr["shape"]), lr["dense_ms"], lr["factorized_ms"],
                        lr["factorized_ms"] / lr["dense_ms"], lr["decision"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
