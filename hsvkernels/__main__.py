"""Command line: python -m hsvkernels <command> (see --help)."""
import argparse
import json
import sys


def _cmd_info(args):
    import torch

    import hsvkernels

    info = hsvkernels.build_info()
    cuda_runnable = bool(info.get("with_cuda")) and torch.cuda.is_available()
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda_kernels_can_run_here"] = cuda_runnable
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
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


def build_parser():
    parser = argparse.ArgumentParser(prog="hsvkernels", description="Factorized convolutions for PyTorch CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="how the extension was built and what can run here")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
