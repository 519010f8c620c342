"""Exported models in onnxruntime: compressed against dense, beside the same pair in torch, one process.

Each torchvision model (random init: latency does not depend on the weights) is converted with each
method, and both the dense and the converted model are exported with hsvkernels.export.to_onnx
(standard ONNX ops; the factorized convs become their chain of Conv/Reshape/MatMul nodes). The
four callables (onnxruntime dense, onnxruntime compressed, torch dense, torch compressed with the
fused kernels) are timed in interleaved rounds on the same input; medians are reported. The
exported file is also checked against the torch model before it is timed.

    python bench/onnx_runtime.py --models resnet18,resnet50,vgg16 --methods hsv --batch 1,8 \
        --out bench/results/onnx-runtime-cpu

--layers times each distinct converted conv alone instead (the kernels against each other, without
the rest of the model): its factorized layer and the dense conv rebuilt from its factors, each in
onnxruntime and in torch, on the layer's input at each batch size.

CPU only (onnxruntime's CPUExecutionProvider), fp32, NCHW, all optimizations of the session on,
intra-op threads = torch's thread count (--threads), inter-op 1.

--fuse-epilogues adds a fifth callable: the torch compressed model with each factorized conv's residual
add and ReLU run inside its op (hsvkernels.fuse_epilogues), as onnxruntime fuses Conv+Add+Relu in its
graph optimizations; it is checked against the unfused model before it is timed.
"""
import argparse
import copy
import fnmatch
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hsvkernels  # noqa: E402
from hsvkernels import _host_malloc, convert, export, models  # noqa: E402
from hsvkernels.fold import fold_batch_norms_  # noqa: E402

from bench import timing  # noqa: E402
from bench.layers import normalized_error  # noqa: E402
from bench.models import add_model_arguments, fuse_or_exit, method_options, to_format  # noqa: E402


def session(path, threads):
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_call(sess, x):
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


def check_same(model, reference, x, what):
    """Raises SystemExit unless model(x) matches reference(x) to float32 rounding."""
    with torch.inference_mode():
        err = normalized_error(model(x), reference(x))
    if not err <= 1e-5:
        raise SystemExit("onnx_runtime.py: %s differs from the model by %.3g of its largest output" % (what, err))


def torch_call(model, x):
    def run():
        with torch.inference_mode():
            model(x)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap, "hsv")
    ap.add_argument("--fold-bn", action="store_true",
                    help="fold BatchNorms into the convs before converting, so neither torch model runs BN passes "
                         "(onnxruntime folds them itself either way)")
    ap.add_argument("--channels-last", action="store_true",
                    help="run the torch models and their inputs channels_last (onnxruntime takes NCHW and picks its "
                         "own layout)")
    ap.add_argument("--fuse-epilogues", action="store_true",
                    help="also time the torch compressed model with residual adds and ReLUs fused into the convs "
                         "(torch_compressed_epilogues)")
    ap.add_argument("--layers", action="store_true", help="time each distinct converted conv alone (see above)")
    ap.add_argument("--layer-filter", default="*", metavar="PATTERN",
                    help="with --layers: only layers whose names match this fnmatch pattern (default: all)")
    ap.add_argument("--out", default=None, help="path without extension for .json and .md")
    _host_malloc.add_argument(ap)   # torch's outputs; onnxruntime reuses its own arena either way
    args = ap.parse_args(argv)
    _host_malloc.configure(args.host_malloc)
    missing = export.missing_packages("onnx", "onnxscript", "onnxruntime")
    if missing:
        raise SystemExit("onnx_runtime.py: " + export.missing_message(missing))
    import onnxruntime

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last and args.layers:
        raise SystemExit("onnx_runtime.py: --channels-last is for whole models; --layers times NCHW layers")
    if args.fuse_epilogues and args.layers:
        raise SystemExit("onnx_runtime.py: --fuse-epilogues is for whole models; --layers times each conv alone")
    env = timing.environment("cpu")
    env["onnxruntime"] = onnxruntime.__version__
    for line in timing.describe_environment(env):
        print(line)
    print("onnxruntime %s, intra-op threads %d, inter-op 1, ORT_ENABLE_ALL; torch threads %d, HSV_CPU_IMPL=%s"
          % (onnxruntime.__version__, threads, threads, os.environ.get("HSV_CPU_IMPL", "fused (default)")),
          flush=True)
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            dense = models.build("torchvision:" + name).eval()
            folds = len(fold_batch_norms_(dense)) if args.fold_bn else 0
            example = torch.randn(1, 3, args.input_size, args.input_size)
            dense_path = os.path.join(tmp, name + "-dense.onnx")
            if not args.layers:
                export.to_onnx(dense, (example,), dense_path)
            for method in args.methods.split(","):
                options = method_options(method, args.ratio, args.macs_ratio)
                compressed = copy.deepcopy(dense)
                report = convert.convert_(compressed, method, example_input=example, progress=False,
                                          decompose_threads=1, **options)
                totals = report.totals()
                if args.layers:
                    rows += time_layers(name, method, compressed, example, batches, threads, tmp, args)
                    continue
                path = os.path.join(tmp, "%s-%s.onnx" % (name, method))
                export.to_onnx(compressed, (example,), path)
                check = export.compare_onnx(path, compressed, (torch.randn(2, 3, args.input_size, args.input_size),))
                if check["max_rel"] > 1e-4:
                    raise SystemExit("onnx_runtime.py: %s %s: the ONNX file differs from the model by %.3g of its "
                                     "largest output" % (name, method, check["max_rel"]))
                sessions = {"ort_dense": session(dense_path, threads), "ort_compressed": session(path, threads)}
                dense_t, compressed_t = (to_format(m, fmt) for m in (dense, compressed))
                fused_t = fuse_or_exit(compressed_t, name) if args.fuse_epilogues else None
                for n in batches:
                    x = torch.randn(n, 3, args.input_size, args.input_size)
                    xt = x.contiguous(memory_format=fmt)
                    fns = {"ort_dense": ort_call(sessions["ort_dense"], x),
                           "ort_compressed": ort_call(sessions["ort_compressed"], x),
                           "torch_dense": torch_call(dense_t, xt), "torch_compressed": torch_call(compressed_t, xt)}
                    if fused_t is not None:
                        check_same(fused_t, compressed_t, xt, "%s %s with fused epilogues" % (name, method))
                        fns["torch_compressed_epilogues"] = torch_call(fused_t, xt)
                    t = timing.time_interleaved(fns, min_run_time=args.min_run_time, num_threads=threads)
                    med = {k: v["median"] for k, v in t.items()}
                    row = dict(model=name, method=method, options=options, batch=n, threads=threads, bn_folded=folds,
                               torch_channels_last=args.channels_last,
                               conv_macs_x=totals["macs_before"] / totals["macs_after"],
                               onnx_bytes_dense=os.path.getsize(dense_path),
                               onnx_bytes_compressed=os.path.getsize(path),
                               onnx_max_rel_diff=check["max_rel"], times=t,
                               ort_ratio=med["ort_compressed"] / med["ort_dense"],
                               torch_ratio=med["torch_compressed"] / med["torch_dense"],
                               ort_vs_torch_compressed=med["ort_compressed"] / med["torch_compressed"],
                               ort_vs_torch_dense=med["ort_dense"] / med["torch_dense"])
                    if fused_t is not None:
                        row["ort_vs_torch_compressed_epilogues"] = (med["ort_compressed"]
                                                                    / med["torch_compressed_epilogues"])
                    rows.append(row)
                    print("%-9s %-5s N=%-3d ort dense %8.2f ms compressed %8.2f ms ratio %.3f | torch dense %8.2f ms "
                          "compressed %8.2f ms ratio %.3f | file %.1f -> %.1f MB"
                          % (name, method, n, 1e3 * med["ort_dense"], 1e3 * med["ort_compressed"], row["ort_ratio"],
                             1e3 * med["torch_dense"], 1e3 * med["torch_compressed"], row["torch_ratio"],
                             row["onnx_bytes_dense"] / 1e6, row["onnx_bytes_compressed"] / 1e6), flush=True)
                    if fused_t is not None:
                        print("%-9s %-5s N=%-3d torch compressed with fused epilogues %8.2f ms: ort compressed / it "
                              "%.3f" % (name, method, n, 1e3 * med["torch_compressed_epilogues"],
                                        row["ort_vs_torch_compressed_epilogues"]), flush=True)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1, default=str)
        with open(args.out + ".md", "w") as f:
            f.write(layers_markdown(rows, env, args) if args.layers else markdown(rows, env, args))
        print("wrote %s.json and %s.md" % (args.out, args.out))
    return 0


def distinct_layers(model, example):
    """(name, FactorizedConv2d, input shape) for each distinct layer config, in model order."""
    seen, out, hooks = set(), [], []
    for name, m in model.named_modules():
        if isinstance(m, hsvkernels.FactorizedConv2d):
            def hook(mod, inputs, output, name=name):
                key = (tuple(inputs[0].shape[1:]), mod.stride, mod.padding, mod.dilation,
                       tuple(tuple(f.shape) for f in mod.factors))
                if key not in seen:
                    seen.add(key)
                    out.append((name, mod, tuple(inputs[0].shape[1:])))
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return out


def time_layers(model_name, method, compressed, example, batches, threads, tmp, args):
    rows = []
    for name, layer, in_shape in distinct_layers(compressed, example):
        if not fnmatch.fnmatchcase(name, args.layer_filter):
            continue
        dense = layer.to_dense().eval()
        paths = {}
        for tag, m in (("dense", dense), ("fact", layer)):
            paths[tag] = os.path.join(tmp, "layer-%s-%s.onnx" % (name, tag))
            export.to_onnx(m, (torch.randn((1,) + in_shape),), paths[tag])
        sessions = {tag: session(p, threads) for tag, p in paths.items()}
        dense_macs = dense.weight.numel()   # per output pixel
        for n in batches:
            x = torch.randn((n,) + in_shape)
            with torch.no_grad():
                out_hw = tuple(layer(x[:1]).shape[2:])
            fns = {"ort_dense": ort_call(sessions["dense"], x), "ort_compressed": ort_call(sessions["fact"], x),
                   "torch_dense": torch_call(dense, x), "torch_compressed": torch_call(layer, x)}
            t = timing.time_interleaved(fns, min_run_time=args.min_run_time, num_threads=threads)
            med = {k: v["median"] for k, v in t.items()}
            macs = layer.macs(*out_hw, *in_shape[1:])
            row = dict(model=model_name, method=method, layer=name, kind=layer.kind, input=list(in_shape),
                       weight=[layer.out_channels, layer.in_channels, *layer.kernel_size], stride=list(layer.stride),
                       batch=n, threads=threads, macs_x=dense_macs * out_hw[0] * out_hw[1] / macs, times=t,
                       gflops_compressed={k: 2 * macs * n / med[k] / 1e9 for k in ("ort_compressed",
                                                                                    "torch_compressed")},
                       ort_ratio=med["ort_compressed"] / med["ort_dense"],
                       torch_ratio=med["torch_compressed"] / med["torch_dense"],
                       ort_vs_torch_compressed=med["ort_compressed"] / med["torch_compressed"])
            rows.append(row)
            print("%-9s %-22s %-18s N=%-3d ort dense %7.3f fact %7.3f ms | torch dense %7.3f fused %7.3f ms | "
                  "ort/torch fact %.2f" % (model_name, name, "x".join(map(str, row["weight"])), n,
                                          1e3 * med["ort_dense"], 1e3 * med["ort_compressed"], 1e3 * med["torch_dense"],
                                          1e3 * med["torch_compressed"], row["ort_vs_torch_compressed"]), flush=True)
    return rows


def layers_markdown(rows, env, args):
    intro = ("Each distinct converted conv alone: onnxruntime %s (CPUExecutionProvider, ORT_ENABLE_ALL) and torch %s "
             "(hsv::conv2d's fused CPU kernels; dense = F.conv2d on the rebuilt weight), %d threads, fp32, NCHW, "
             "medians of interleaved rounds" % (env["onnxruntime"], env["torch"], rows[0]["threads"] if rows else 0))
    head = ["model", "layer", "weight", "input", "stride", "batch", "MACs x", "ORT dense ms", "ORT fact ms",
            "torch dense ms", "torch fused ms", "ORT fact / torch fused", "GFLOP/s ORT fact", "GFLOP/s torch fused"]
    body = []
    for r in rows:
        t = {k: 1e3 * v["median"] for k, v in r["times"].items()}
        body.append([r["model"], r["layer"], "x".join(map(str, r["weight"])), "x".join(map(str, r["input"])),
                     r["stride"][0], r["batch"], "%.2f" % r["macs_x"]]
                    + ["%.3f" % t[k] for k in ("ort_dense", "ort_compressed", "torch_dense", "torch_compressed")]
                    + ["%.2f" % r["ort_vs_torch_compressed"]]
                    + ["%.1f" % r["gflops_compressed"][k] for k in ("ort_compressed", "torch_compressed")])
    return _document(intro, env, head, body)


def markdown(rows, env, args):
    threads = rows[0]["threads"] if rows else 0
    intro = ("Exported models in onnxruntime %s (CPUExecutionProvider, %d intra-op threads, ORT_ENABLE_ALL) beside "
             "torch %s (%d threads, hsv::conv2d's fused CPU kernels), fp32, %s, input %d, medians of interleaved "
             "rounds%s" % (env["onnxruntime"], threads, env["torch"], threads,
                           "torch channels_last (onnxruntime NCHW input)" if args.channels_last else "NCHW",
                           args.input_size,
                           ", BatchNorms folded into the convs before converting" if args.fold_bn else ""))
    head = ["model", "method", "batch", "conv MACs", "ONNX MB dense -> compressed", "ORT dense ms",
            "ORT compressed ms", "ORT ratio", "torch dense ms", "torch compressed ms", "torch ratio"]
    fused = args.fuse_epilogues
    if fused:
        head += ["torch compressed + epilogues ms", "ORT compressed / torch compressed + epilogues"]
    body = []
    for r in rows:
        t = {k: 1e3 * v["median"] for k, v in r["times"].items()}
        body.append([r["model"], r["method"], r["batch"], "%.2fx" % r["conv_macs_x"],
                     "%.1f -> %.1f" % (r["onnx_bytes_dense"] / 1e6, r["onnx_bytes_compressed"] / 1e6),
                     "%.2f" % t["ort_dense"], "%.2f" % t["ort_compressed"], "%.3f" % r["ort_ratio"],
                     "%.2f" % t["torch_dense"], "%.2f" % t["torch_compressed"], "%.3f" % r["torch_ratio"]]
                    + (["%.2f" % t["torch_compressed_epilogues"], "%.3f" % r["ort_vs_torch_compressed_epilogues"]]
                       if fused else []))
    return _document(intro, env, head, body)


def _document(intro, env, head, body):
    """The intro sentence with the machine and the command, then the table."""
    lines = ["%s; host malloc: %s. Machine: %s, %s logical CPUs. Command: `%s` (commit %s)."
             % (intro, env["host_malloc"], env["cpu_model"], env["cpu_count"], env["command"], env["git_commit"]), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
