"""python -m hsvkernels {info, compress, export, report, bench, demo}.

Exit codes: 0 success, 2 usage error (argparse), 1 failure with a one-line
message on stderr. User mistakes (unknown model, unreadable file, bad option)
are reported without a traceback; --debug shows it.
"""
import argparse
import copy
import json
import logging
import sys

from . import _host_malloc

USER_ERRORS = (ValueError, OSError)


def main(argv=None):
    args = build_parser().parse_args(argv)
    # Per-layer problems are in the printed report already; log them only when asked.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print("hsvkernels %s: error: %s" % (args.command, " ".join(str(exc).split())), file=sys.stderr)
        return 1


def build_parser():
    p = argparse.ArgumentParser(prog="hsvkernels", description="Factorized convolutions for PyTorch CNNs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log each layer's decision as it is made")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="how the extension was built and what can run here")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_cmd_info)

    c = sub.add_parser("compress", help="factorize a model's convolutions and print the per-layer report")
    c.add_argument("model", help="torchvision:NAME (random init unless --weights) or a directory written by --out")
    c.add_argument("--weights", metavar="FILE", help="state_dict to load first (.safetensors, or a torch.save file)")
    c.add_argument("--method", default="svd", help="decomposition method (default: svd)")
    c.add_argument("--ratio", type=float, help="target parameter compression per layer (default: 4, unless --rank or an --option "
                        "whose name contains rank or ratio, e.g. macs_ratio, is given)")
    c.add_argument("--rank", type=int, help="explicit rank for every layer")
    c.add_argument("--budget", type=float, metavar="RATIO",
                   help="model-wide parameter compression, spread over the layers where it costs the least error "
                        "(hsvkernels.ranks; instead of --ratio/--rank)")
    c.add_argument("--macs-budget", type=float, metavar="RATIO", help="model-wide MAC reduction (with or without "
                                                                       "--budget)")
    c.add_argument("--latency-budget", type=float, metavar="RATIO",
                   help="model-wide reduction of the convs' latency measured on --device at --input-size (with or "
                        "without --budget; instead of --macs-budget): hsvkernels.ranks.select(latency_ratio=)")
    c.add_argument("--latency-points", type=_positive_int,
                   help="with --latency-budget: options decomposed and timed per layer (>= 2, default 6)")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra method option, forwarded to decompose (VALUE parsed as JSON when it can be)")
    c.add_argument("--skip", action="append", default=[], metavar="PATTERN", help="fnmatch pattern of layers to keep dense")
    c.add_argument("--min-params", type=int, help="convs with fewer weights stay dense")
    c.add_argument("--input-size", default="224", type=_input_size, metavar="[N x][C x]H[xW]",
                   help="example input for output sizes, calibration and --verify (default: 1x3x224x224)")
    c.add_argument("--measure", action="store_true", help="time each layer and keep it dense if factorizing is slower")
    c.add_argument("--fold-bn", action="store_true",
                   help="fold each BatchNorm2d into the conv before it, then factorize")
    c.add_argument("--verify", action="store_true",
                   help="compare the compressed model with a dense model rebuilt from its factors and with the original")
    c.add_argument("--out", metavar="DIR", help="save the compressed model (plan JSON + safetensors + report)")
    ft = c.add_argument_group("fine-tuning after compression (optional)")
    ft.add_argument("--finetune", metavar="DATA",
                    help="train the compressed model on DATA: an image folder (DATA/<class>/<image>) or 'digits' "
                         "(scikit-learn's bundled digits, its own test split used for --val)")
    ft.add_argument("--val", metavar="DIR", help="image folder scored before and after fine-tuning")
    ft.add_argument("--epochs", type=_positive_int, default=1, help="fine-tuning epochs (default 1)")
    ft.add_argument("--lr", type=_positive_float, default=1e-4, help="Adam learning rate (default 1e-4)")
    ft.add_argument("--max-steps", type=_positive_int, help="stop fine-tuning after this many batches")
    ft.add_argument("--batch-size", type=_positive_int, default=32, help="(default 32)")
    ft.add_argument("--distill", action="store_true", help="also match the uncompressed model's outputs "
                                                           "(knowledge distillation)")
    c.add_argument("--device", default="cpu", type=_device)
    c.add_argument("--seed", type=int, default=0, help="seed for random init and the random batches")
    c.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    c.add_argument("--decompose-threads", type=_positive_int, default=1,
                   help="CPU threads while decomposing (default 1: threaded LAPACK SVD is slow on shared cores)")
    _output_flags(c)
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("export", help="write a model as a graph of standard ops: ONNX and/or torch.export .pt2")
    e.add_argument("model", help="a directory written by compress --out (or torchvision:NAME, exported dense)")
    e.add_argument("--onnx", metavar="FILE", help="write an ONNX model (needs the packages onnx and onnxscript)")
    e.add_argument("--pt2", metavar="FILE", help="write a torch.export program (torch.export.load reads it)")
    e.add_argument("--input-size", default="224", type=_input_size, metavar="[N x][C x]H[xW]",
                   help="example input the graph is traced with (default: 1x3x224x224)")
    e.add_argument("--static-batch", action="store_true",
                   help="fix the batch size to the example's (default: any batch size)")
    e.add_argument("--dynamic-size", action="store_true",
                   help="leave the image height and width free too (default: the example's)")
    e.add_argument("--verify", action="store_true",
                   help="run the ONNX file in onnxruntime on a fresh input, compare with the model in torch, and "
                        "fail if they differ by more than --rtol of the output's largest value")
    e.add_argument("--rtol", type=float, default=1e-4, help="with --verify (default 1e-4, for float32)")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="time a compressed model against its dense counterpart, end to end")
    b.add_argument("model", help="torchvision:NAME (converted here with --method/--ratio) or a directory written by "
                                 "compress --out (timed against the dense model rebuilt from its factors)")
    b.add_argument("--method", help="torchvision:NAME: decomposition method (default: svd)")
    b.add_argument("--ratio", type=float, help="torchvision:NAME: parameter compression per layer (default 4)")
    b.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="torchvision:NAME: extra method option")
    b.add_argument("--batch", default="1,8", help="comma list of batch sizes (default 1,8)")
    b.add_argument("--input-size", default="224", type=_input_size, metavar="[C x]H[xW]")
    b.add_argument("--channels-last", action="store_true")
    b.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="both models and the input cast to it after converting (in float32); the fused CPU kernels "
                        "are float32, other dtypes run the unfused chain there")
    b.add_argument("--fold-bn", action="store_true",
                   help="torchvision:NAME: fold BatchNorms into their convs in both models before converting")
    b.add_argument("--fuse-epilogues", action="store_true",
                   help="run the compressed model with its convs' residual adds and ReLUs fused into the op "
                        "(hsvkernels.fuse_epilogues; fold BNs first, here or at compress time)")
    b.add_argument("--compile", action="store_true",
                   help="time both models through torch.compile (Inductor; compiled in the warm-up calls, which are "
                        "not timed), as a deployment that compiles would run them")
    b.add_argument("--per-layer", action="store_true",
                   help="also time each conv inside both models' forwards (hooks) and alone, back to back on the "
                        "input it saw there (hsvkernels.benchmark.layer_times); not with --compile")
    b.add_argument("--runs", type=int, default=20, help="with --per-layer: hooked forwards and alone calls per conv")
    b.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--min-run-time", type=_seconds, default=1.0, help="seconds of timing per model and batch")
    b.add_argument("--device", default="cpu", type=_device)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _host_malloc.add_argument(b)
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", help="print the report of a directory written by compress --out")
    r.add_argument("dir")
    _output_flags(r)
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="train a small CNN on bundled digits, compress it with each method, "
                                    "fine-tune, and compare accuracy, size and latency")
    d.add_argument("--methods", type=_method_list, metavar="M1,M2,...",
                   help="comma-separated methods (default: svd,hsv,tucker2,ht2,tt_tucker,cp; kcp is slow to "
                        "convert here; --quick: svd,tucker2)")
    d.add_argument("--epochs", type=_positive_int, help="training epochs of the dense model (default 4; --quick 1)")
    d.add_argument("--ft-epochs", type=_positive_int, default=1, help="fine-tuning epochs per method (default 1)")
    d.add_argument("--ratio", type=float, default=4.0, help="parameter compression per layer (default 4)")
    d.add_argument("--out", metavar="DIR", help="where to save the most accurate compressed model (default: a temp dir)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--quick", action="store_true", help="tiny settings, seconds not minutes (for tests)")
    d.set_defaults(func=cmd_demo)
    return p


def _method_list(text):
    return [m.strip() for m in text.split(",") if m.strip()]


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError("expected a positive integer, got %r" % text)
    return n


def _finite_positive(what):
    """An argparse type for a finite float > 0 (NaN or inf seconds would keep a timer running forever)."""
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not 0 < v < float("inf"):
            raise argparse.ArgumentTypeError("expected %s > 0, got %r" % (what, text))
        return v
    return parse


_positive_float = _finite_positive("a finite number")
_seconds = _finite_positive("a finite number of seconds")


def _device(text):
    import torch
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(str(exc).splitlines()[0]) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("%r: no CUDA device is available here" % text)
    return text


def _check_output_folder(flag, path):
    """An output file's folder must exist; checked before the slow work, not after it."""
    import os
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if folder and not os.path.isdir(folder):
        raise ValueError("%s %s: directory %s does not exist" % (flag, path, folder))


def _output_flags(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("--markdown", action="store_true", help="print the report as a Markdown table")
    p.add_argument("--plot", metavar="PNG", help="also write a compression-vs-error plot")


def _input_size(text):
    try:
        dims = [int(d) for d in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError("expected sizes like 224, 64x64, 3x64x64 or 1x3x64x64, got %r" % text)
    if not 1 <= len(dims) <= 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError("expected 1 to 4 positive sizes like 1x3x64x64, got %r" % text)
    if len(dims) == 1:
        dims = dims * 2
    return tuple([1, 3][: 4 - len(dims)] + dims) if len(dims) < 4 else tuple(dims)


# info -------------------------------------------------------------------------------------------

def _cmd_info(args):
    import torch

    import hsvkernels

    info = hsvkernels.build_info()
    cuda_runnable = bool(info.get("with_cuda")) and torch.cuda.is_available()
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda_kernels_can_run_here"] = cuda_runnable
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    info["onnx_export_packages"] = _versions("onnx", "onnxscript", "onnxruntime")   # None: not installed
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    for key in sorted(info):
        print("%-26s %s" % (key, info[key]))
    if not info.get("extension"):
        print("\nThe native extension is missing: the op runs on the pure-PyTorch reference path.")
    elif info.get("with_cuda") and not cuda_runnable:
        print("\nCUDA kernels are compiled in but cannot run here: no CUDA device is visible.")
    return 0


def _versions(*packages):
    from importlib import metadata

    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# compress -----------------------------------------------------------------------------------

def cmd_compress(args):
    import torch

    from . import convert, io

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ratio is not None and args.rank is not None:
        raise ValueError("give --ratio or --rank, not both")
    _check_output_folder("--plot", args.plot)
    budget = {k: v for k, v in (("ratio", args.budget), ("macs_ratio", args.macs_budget)) if v is not None}
    if (budget or args.latency_budget is not None) and (args.ratio is not None or args.rank is not None):
        raise ValueError("--budget/--macs-budget/--latency-budget size every layer; do not also give --ratio or --rank")
    if args.latency_budget is not None and args.macs_budget is not None:
        raise ValueError("give --macs-budget or --latency-budget, not both")
    for flag, value in (("--budget", args.budget), ("--macs-budget", args.macs_budget)):
        if value is not None and not 1 <= value < float("inf"):
            raise ValueError("%s is a reduction factor >= 1 (dense / compressed, model-wide), got %g" % (flag, value))
    if args.latency_budget is not None and not args.latency_budget >= 1:
        raise ValueError("--latency-budget is a latency reduction factor >= 1 (2: half the measured conv latency), "
                         "got %g" % args.latency_budget)
    if args.latency_points is not None and args.latency_budget is None:
        raise ValueError("--latency-points sets how --latency-budget times each layer; give --latency-budget too")
    if args.latency_points is not None and args.latency_points < 2:
        raise ValueError("--latency-points must be at least 2 (the cheapest and the most accurate options), got %d"
                         % args.latency_points)
    if (args.val or args.distill) and not args.finetune:
        raise ValueError("--val and --distill need --finetune DATA")
    options = dict(_parse_option(o) for o in args.option)
    if args.latency_budget is not None:
        pass  # a ranks plan, made below once the model is loaded
    elif budget:
        options["budget"] = budget
    elif args.rank is not None:
        options["rank"] = args.rank
    elif args.ratio is not None:
        options["ratio"] = args.ratio
    elif not any("rank" in k or "ratio" in k for k in options):
        options["ratio"] = 4.0  # the default target, unless a method option already picks the size
    if args.min_params is not None:
        options["min_params"] = args.min_params
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # random-init models and the random batches are then reproducible

    model = _load_model(args.model, args.weights).to(device).eval()
    data = _finetune_data(args) if args.finetune else None  # bad data paths fail before the slow part
    original = copy.deepcopy(model) if args.verify or args.distill else None
    gen = torch.Generator().manual_seed(args.seed)
    calib = torch.randn(args.input_size, generator=gen).to(device)
    if args.latency_budget is not None:
        from . import ranks
        points = {} if args.latency_points is None else {"latency_points": args.latency_points}   # else select's
        plan = ranks.select(model, args.method, ratio=args.budget, latency_ratio=args.latency_budget,
                            example_input=calib, progress=not args.json, **points)
        print("plan: %.2fx measured conv latency, %.2fx conv parameters, %.2fx conv MACs"
              % (plan.latency_reduction(), plan.compression(), plan.mac_reduction()), file=_aux(args))
        options["ranks"] = plan
    report = convert.convert_(model, args.method, skip=args.skip, example_input=calib, measure=args.measure,
                              fold_bn=args.fold_bn, decompose_threads=args.decompose_threads or None, **options)
    if args.latency_budget is not None:   # the plan is what convert_ saw; the report says where it came from
        report.options["budget"] = dict(budget, latency_ratio=args.latency_budget)
    _print_report(report, args)
    if data is not None:
        _finetune(model, original if args.distill else None, data, args, device)
    if args.out:
        io.save(model, args.out, report=report)
        print("saved to %s" % args.out, file=_aux(args))
    if args.verify:
        return _verify(model, original, torch.randn(args.input_size, generator=gen).to(device), _aux(args))
    return 0


def _finetune_data(args):
    """(train loader, validation loader or None) for compress --finetune."""
    import torch

    from . import data

    _, channels, height, width = args.input_size
    if height != width:
        raise ValueError("--finetune needs a square --input-size, got %dx%d" % (height, width))
    if args.finetune == "digits":
        if args.val:
            raise ValueError("--finetune digits brings its own test split; leave out --val")
        train, val = data.digits(size=height, channels=channels, seed=args.seed)
    else:
        if channels != 3:
            raise ValueError("image folders give 3-channel images; --input-size has %d channels" % channels)
        train = data.image_folder(args.finetune, size=height, train=True)
        val = data.image_folder(args.val, size=height) if args.val else None
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=gen)
    val_loader = torch.utils.data.DataLoader(val, batch_size=args.batch_size) if val is not None else None
    return loader, val_loader


def _finetune(model, teacher, data, args, device):
    from .finetune import accuracy, finetune

    loader, val = data
    out = _aux(args)
    if val is not None:
        print("accuracy before fine-tuning: %.4f" % accuracy(model, val, device), file=out)
    losses = finetune(model, loader, epochs=args.epochs, lr=args.lr, teacher=teacher, device=device,
                      max_steps=args.max_steps, seed=args.seed)
    if not losses:
        raise ValueError("--finetune %s gave no training batches" % args.finetune)
    print("fine-tuned %d step(s): loss %.4f -> %.4f" % (len(losses), losses[0], losses[-1]), file=out)
    if val is not None:
        print("accuracy after fine-tuning:  %.4f" % accuracy(model, val, device), file=out)


def _parse_option(text):
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError("--option expects KEY=VALUE with KEY a Python identifier, got %r" % text)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _load_model(spec, weights):
    import os

    from . import io, models

    if os.path.isdir(spec):
        model = io.load(spec)
    elif ":" not in spec and not os.path.exists(spec):
        raise ValueError("%r: no such directory, and not a torchvision:NAME reference either" % spec)
    elif spec.startswith("torchvision:") or not os.path.exists(spec):
        model = models.build(spec)
    else:
        raise ValueError("%r is a file; expected torchvision:NAME or a directory written by compress --out "
                         "(pass weights with --weights)" % spec)
    if weights:
        _load_weights(model, weights)
    return model


def _load_weights(model, path):
    import torch

    from . import io

    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except SafetensorError as exc:
            raise ValueError("cannot read %s: %s" % (path, exc)) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # pickle and zip errors come in many types; all mean "not a state_dict file"
            raise ValueError("cannot read %s as a state_dict: %s" % (path, exc)) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # common checkpoint layout
    if not isinstance(state, dict):
        raise ValueError("%s does not hold a state_dict (found %s)" % (path, type(state).__name__))
    try:
        model.load_state_dict(io.with_module_versions(state, model.state_dict()), strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())   # torch lists the missing, unexpected and mis-shaped keys
        raise ValueError("weights in %s do not fit the model: %s" % (
            path, detail if len(detail) <= 600 else detail[:597] + "...")) from None


def _aux(args):
    """Where lines other than the report go: stderr when stdout must stay valid JSON."""
    return sys.stderr if args.json else sys.stdout


def _verify(model, original, x, out):
    """Prints how the compressed model compares with its dense rebuild and the original; 1 if they disagree."""
    import torch

    from . import _outputs
    from .convert import revert_

    rebuilt = copy.deepcopy(model)
    revert_(rebuilt)
    with torch.no_grad():
        y, y_dense, y_orig = model(x), rebuilt(x), original(x)
    rel_dense = _outputs.relative_error(y, y_dense)
    print("verify on a random %s batch:" % "x".join(map(str, x.shape)), file=out)
    if rel_dense is None:
        print("verify: FAILED: the outputs (%s) hold no tensors of matching shapes to compare" % type(y).__name__,
              file=out)
        return 1
    max_abs = _outputs.max_abs_difference(y, y_dense)
    print("  compressed vs dense rebuilt from factors: max abs diff %.3e, relative diff %.3e" % (max_abs, rel_dense), file=out)
    rel_orig = _outputs.relative_error(y, y_orig)
    print("  compressed vs original dense model:       relative output error %s"
          % ("%.4f" % rel_orig if rel_orig is not None else "n/a (outputs differ in shape)"), file=out)
    # The two compute the same function; only floating point rounding may differ.
    tol = 1e-4 if x.dtype != torch.float64 else 1e-10
    if not rel_dense <= tol:
        print("verify: FAILED (relative diff above %.0e)" % tol, file=out)
        return 1
    print("verify: OK", file=out)
    return 0


# bench --------------------------------------------------------------------------------------

def cmd_bench(args):
    import os

    import torch

    from . import benchmark, convert
    from .nn import FactorizedConv2d

    _host_malloc.configure(args.host_malloc)   # before the models and inputs are allocated
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise ValueError("--batch expects a comma list of integers, got %r" % args.batch) from None
    if min(batches) < 1:
        raise ValueError("--batch sizes must be >= 1, got %r" % args.batch)
    if args.per_layer and args.compile:
        raise ValueError("--per-layer times the convs as module calls, which torch.compile removes; drop --compile")
    if args.runs < 1:
        raise ValueError("--runs must be at least 1, got %d" % args.runs)
    if args.fold_bn and os.path.isdir(args.model):
        raise ValueError("--fold-bn is for torchvision:NAME models; a compressed directory keeps the folds it was "
                         "made with (compress --fold-bn)")
    given = [flag for flag, v in (("--method", args.method), ("--ratio", args.ratio), ("--option", args.option))
             if v is not None and v != []]
    if given and os.path.isdir(args.model):
        raise ValueError("%s: for torchvision:NAME models; a compressed directory is timed with the factorizations "
                         "its plan holds" % "/".join(given))
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = _load_model(args.model, None).to(device).eval()
    if os.path.isdir(args.model):
        compressed, dense = model, benchmark.dense_twin(model)
        kinds = sorted({m.kind for m in compressed.modules() if isinstance(m, FactorizedConv2d)})
        method = "+".join(kinds) or "none factorized"
    else:
        method = args.method or "svd"
        if args.fold_bn:
            from .fold import fold_batch_norms_
            fold_batch_norms_(model)
        options = dict(_parse_option(o) for o in args.option)
        options.setdefault("ratio", args.ratio if args.ratio is not None else 4.0)
        dense, compressed = model, copy.deepcopy(model)
        convert.convert_(compressed, method, example_input=torch.randn(args.input_size[1:]).unsqueeze(0).to(device),
                         progress=False, decompose_threads=1, **options)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    dtype = getattr(torch, args.dtype)
    dense, compressed = dense.to(dtype, memory_format=fmt), compressed.to(dtype, memory_format=fmt)
    if args.fuse_epilogues:
        from .epilogue import fuse_epilogues
        compressed = fuse_epilogues(compressed)
    if args.compile:
        dense, compressed = torch.compile(dense, dynamic=False), torch.compile(compressed, dynamic=False)
    rows = []
    for n in batches:
        x = torch.randn((n,) + tuple(args.input_size[1:]), device=device, dtype=dtype).contiguous(memory_format=fmt)
        rows.append(dict(batch=n, **benchmark.time_pair(dense, compressed, x, min_run_time=args.min_run_time)))
        if args.per_layer:
            rows[-1]["per_layer"] = benchmark.layer_times({"dense": dense, "compressed": compressed}, x,
                                                          runs=args.runs)
    result = {"model": args.model, "method": method, "input": list(args.input_size[1:]), "dtype": args.dtype,
              "channels_last": args.channels_last, "fold_bn": args.fold_bn, "fuse_epilogues": args.fuse_epilogues,
              "compile": args.compile,
              "flags": benchmark.flags(), "command": " ".join(sys.argv),
              "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    layout = ("channels_last" if args.channels_last else "NCHW") + ("  torch.compile" if args.compile else "")
    layout += "" if args.dtype == "float32" else "  " + args.dtype
    print("%s  %s  input %s  threads %d  %s" % (args.model, method, "x".join(map(str, args.input_size[1:])),
                                               result["flags"]["threads"], layout))
    print("host malloc: %s" % result["flags"]["host_malloc"])
    print("%6s %12s %14s %8s" % ("batch", "dense ms", "compressed ms", "ratio"))
    for r in rows:
        print("%6d %12.3f %14.3f %8.3f" % (r["batch"], 1e3 * r["dense_s"], 1e3 * r["compressed_s"], r["ratio"]))
    for r in rows:
        if "per_layer" in r:
            print()
            for line in _per_layer_lines(r["batch"], r["per_layer"]):
                print(line)
    return 0


def _per_layer_lines(batch, times):
    """The table of bench --per-layer for one batch: each conv in the model and alone, dense and compressed."""
    dense, comp = times["dense"]["layers"], times["compressed"]["layers"]
    ms = lambda s: "%9.3f" % (1e3 * s) if s is not None else "%9s" % "-"   # noqa: E731
    ratio = lambda a, b: "%7.2f" % (a / b) if a is not None and b else "%7s" % "-"   # noqa: E731
    lines = ["batch %d, per conv: ms inside the forward (hooks) and alone (back to back on the same input)" % batch,
             "%-30s %-16s %9s %9s %7s %9s %7s" % ("conv", "input", "dense", "compr.", "ratio", "c. alone",
                                                  "in/alone")]
    for name, c in comp.items():
        d = dense.get(name, {})
        shape = "x".join(map(str, c["input"][1:]))
        lines.append("%-30s %-16s %s %s %s %s %s" % (name[-30:], shape, ms(d.get("in_model_s")), ms(c["in_model_s"]),
                                                    ratio(c["in_model_s"], d.get("in_model_s")), ms(c["alone_s"]),
                                                    ratio(c["in_model_s"], c["alone_s"])))
    for label, t in (("dense", times["dense"]), ("compressed", times["compressed"])):
        inside = sum(v["in_model_s"] for v in t["layers"].values())
        alone = sum(v["alone_s"] for v in t["layers"].values() if v["alone_s"] is not None)
        lines.append("%-10s forward %.3f ms: convs %.3f ms inside it (sum of medians: %.0f%%), %.3f ms alone" % (
            label, 1e3 * t["forward_s"], 1e3 * inside, 100 * inside / t["forward_s"], 1e3 * alone))
    return lines


# export -------------------------------------------------------------------------------------

def cmd_export(args):
    import torch

    from . import export

    if not args.onnx and not args.pt2:
        raise ValueError("give --onnx FILE and/or --pt2 FILE")
    if args.verify and not args.onnx:
        raise ValueError("--verify checks the ONNX file; give --onnx FILE")
    _check_output_folder("--onnx", args.onnx)
    _check_output_folder("--pt2", args.pt2)
    missing = export.missing_packages(*(("onnx", "onnxscript") if args.onnx else ()),
                                      *(("onnxruntime",) if args.verify else ()))
    if missing:   # before the model is loaded and traced
        raise ValueError(export.missing_message(missing))
    torch.manual_seed(args.seed)
    model = _load_model(args.model, None).eval()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.input_size, generator=gen)
    dynamic = not args.static_batch
    if args.pt2:
        torch.export.save(export.export(model, (x,), dynamic_batch=dynamic, dynamic_size=args.dynamic_size), args.pt2)
        print("wrote %s" % args.pt2)
    if args.onnx:
        export.to_onnx(model, (x,), args.onnx, dynamic_batch=dynamic, dynamic_size=args.dynamic_size)
        print("wrote %s" % args.onnx)
    if args.verify:
        # Other sizes than the traced ones where they are free, so a baked-in size shows.
        n, c, h, w = args.input_size
        shape = (n + 1 if dynamic else n, c) + ((h + 8, w + 16) if args.dynamic_size else (h, w))
        err = export.compare_onnx(args.onnx, model, (torch.randn(shape, generator=gen),))
        ok = err["max_rel"] <= args.rtol
        print("onnxruntime vs torch at input %s: max abs diff %.3g, max rel diff %.3g (%s, rtol %g)"
              % ("x".join(map(str, shape)), err["max_abs"], err["max_rel"], "ok" if ok else "FAILED", args.rtol))
        return 0 if ok else 1
    return 0


# report -------------------------------------------------------------------------------------

def cmd_report(args):
    from . import io
    from .report import Report

    report = io.load_report(args.dir)
    if report is None:
        plan = io.read_plan(args.dir)
        report = _report_from_plan(plan, Report)
        print("(no report.json in %s: showing the saved plan only)" % args.dir, file=sys.stderr)
    _print_report(report, args)
    return 0


def _report_from_plan(plan, Report):
    import math

    from .report import FACTORIZED, LayerRow

    rows = []
    for layer in plan["layers"]:
        shape = (layer["out_channels"], layer["in_channels"], *layer["kernel_size"])
        bias = layer["out_channels"] if layer["bias"] else 0
        rows.append(LayerRow(name=layer["name"], shape=shape, method=layer["kind"], meta=layer["meta"],
                             params_before=math.prod(shape) + bias,
                             params_after=sum(math.prod(s) for s in layer["factor_shapes"]) + bias,
                             decision=FACTORIZED))
    return Report(layers=rows, method=",".join(sorted({r.method for r in rows})) or None)


def _print_report(report, args):
    if args.json:
        print(report.to_json())
    elif args.markdown:
        print(report.to_markdown())
    else:
        print(report)
    if args.plot:
        report.plot(args.plot)
        print("plot written to %s" % args.plot, file=_aux(args))


# demo ---------------------------------------------------------------------------------------

def cmd_demo(args):
    import torch

    from . import demo
    from .decompose import METHODS

    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods or () if m not in METHODS]
    if unknown:
        raise ValueError("unknown method(s) %s; expected some of: %s"
                         % (", ".join(unknown), ", ".join(sorted(METHODS))))
    epochs = args.epochs or (1 if args.quick else 4)
    result = demo.run(args.methods, epochs=epochs, ft_epochs=args.ft_epochs, ratio=args.ratio, seed=args.seed,
                      out=args.out, quick=args.quick)
    diff = result["reload_max_abs_diff"]
    # A save/load round trip must give the same function; anything else is a bug.
    return 0 if diff is not None and diff <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
