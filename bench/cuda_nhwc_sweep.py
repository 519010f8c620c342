"""Channels_last fused kernels on the GPU: dense cuDNN vs composite vs the WMMA and mma kernels, per layer.

Each path is captured `--reps` times into one CUDA graph and timed by replaying
it (medians of interleaved blocks, bench/timing.py), so launch overhead is out
and the numbers are device time per call. `--sweep` adds the mma kernel with
every forced (pixel fragments per warp MI, cluster split S, K step), to check the
tile model in two_stage_mma.cu against the best setting. `--wgmma` adds the
wgmma kernel (sm_90a, two_stage_wgmma.cu) and `--wgmma-sweep` its every forced
(warpgroups per CTA, cluster split S); each wgmma row's error against the
composite chain is checked before it is timed. `--fold` runs every fused path
with HSV_CUDA_FOLD=on, so methods that fold into the two-stage form (tucker2,
ht2, tt_tucker, cp) run its kernels on folded factors, and adds "unfolded" (the
fused path without folding: tucker2's own kernel, the composite chain for the
others); a folded answer is checked against composite before it is timed.
`--kcp` adds the fused kcp kernel (HSV_CUDA_KCP=on, kcp_cuda.cu) for method kcp,
checked against composite (and that it ran) before it is timed, with its tile.

    python bench/cuda_nhwc_sweep.py --tags L1,L2,L3,L4,L5,L6,L7,L8 --batch 32 --methods hsv [--sweep]
    python bench/cuda_nhwc_sweep.py --tags L1,L2,L3,L4,L5,L6,L7,L8 --batch 32,1 --methods kcp --no-wmma --kcp
"""
import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hsvkernels  # noqa: E402
from bench import layers, suite, timing  # noqa: E402
from hsvkernels._extension import _C  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def captured(fn, env, reps):
    """fn run `reps` times in one CUDA graph, captured with the variables `env` set; returns its replay and
    the config of the kernel it launched (empty where neither the mma nor the wgmma kernel ran)."""
    config = []
    with timing.env_set(env):
        wg = env.get("HSV_CUDA_NHWC") == "wgmma"
        last = _C.cuda_wgmma_last_config if wg else _C.cuda_mma_last_config
        count = _C.cuda_wgmma_launch_count if wg else _C.cuda_mma_launch_count
        before = count()

        def record():
            if count() > before:
                config.extend(last())
        replay = layers.graphed(fn, reps, after_warmup=record)
    return replay, config


def check_kcp(op, method, shape, batch):
    """The kcp kernel's (tile_h, tile_w, nb, shared-memory bytes) after checking that it ran and agrees with
    the composite chain; None where it does not take the layer (it falls back: timing it would time the chain)."""
    with timing.env_set({"HSV_CUDA_IMPL": "composite"}):
        y_comp = op()
    before = _C.cuda_kcp_launch_count()
    with timing.env_set({"HSV_CUDA_IMPL": "fused", "HSV_CUDA_KCP": "on"}):
        y = op()
    if _C.cuda_kcp_launch_count() == before:
        print("%s b%d %s: the kcp kernel does not take this layer" % (shape.name, batch, method))
        return None
    err = layers.normalized_error(y, y_comp)
    if not err <= 6e-2:   # never time a wrong answer
        sys.exit("kcp: %s b%d: error %.3g against the composite chain" % (shape.name, batch, err))
    return tuple(_C.cuda_kcp_last_config())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    suite.add_filter_args(p)
    p.add_argument("--methods", default="hsv")
    p.add_argument("--batch", default="32", help="comma-separated batch sizes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--macs-ratio", type=float, default=4.0, help="for the methods that take it (hsv, kcp, svd)")
    p.add_argument("--reps", type=int, default=10, help="calls per captured graph")
    p.add_argument("--min-run-time", type=float, default=0.1)
    p.add_argument("--sweep", action="store_true", help="also every forced (MI, S, K step) of the mma kernel")
    p.add_argument("--pack-aten", action="store_true",
                   help="also the mma kernel with HSV_CUDA_PACK=aten (4 to 6 ATen packing ops per graph replay "
                        "instead of the one packing kernel)")
    p.add_argument("--halo-off", action="store_true",
                   help="also the mma kernel with HSV_CUDA_MMA_HALO=0 (the per-tap gather, no input blocks)")
    p.add_argument("--no-wmma", action="store_true", help="leave out the WMMA kernel (the 8.x path)")
    p.add_argument("--wgmma", action="store_true", help="also the wgmma kernel (HSV_CUDA_NHWC=wgmma, sm_90a)")
    p.add_argument("--wgmma-sweep", action="store_true",
                   help="also the wgmma kernel with every forced (warpgroups per CTA, cluster split S)")
    p.add_argument("--fold", action="store_true",
                   help="every fused path with HSV_CUDA_FOLD=on, plus the fused path without it ('unfolded')")
    p.add_argument("--kcp", action="store_true", help="also the fused kcp kernel (HSV_CUDA_KCP=on) for method kcp")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cuda_nhwc_sweep.py: needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    dtype = DTYPES[args.dtype]
    print("device %s  torch %s  cudnn %s  dtype %s channels_last  cudnn.benchmark True  graphs of %d calls"
          % (torch.cuda.get_device_name(), torch.__version__, torch.backends.cudnn.version(), args.dtype, args.reps))
    print("times: device us per call (median); mma config = (MI, cluster S, tiles, K step, input blocks, "
          "block rows, block columns); wgmma config = (warpgroups per CTA, cluster S, tiles, K step)")
    if (args.wgmma or args.wgmma_sweep) and not hsvkernels.build_info().get("cuda_sm90a"):
        sys.exit("cuda_nhwc_sweep.py: --wgmma needs an extension built with sm_90a code (cuda_sm90a is false)")
    torch.manual_seed(0)
    rows = []
    for shape in suite.select_from_args(args):
        kw = shape.conv_kwargs()
        w = torch.randn(shape.weight_shape, dtype=torch.float32)
        for batch in [int(b) for b in args.batch.split(",")]:
            x = torch.randn(batch, shape.cin, shape.h, shape.w, device="cuda", dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            wd = w.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
            for method in args.methods.split(","):
                targets = dict(ratio=args.ratio)
                if layers.accepts(hsvkernels.METHODS[method], "macs_ratio"):   # hsv, kcp, svd
                    targets["macs_ratio"] = args.macs_ratio
                if method == "kcp":   # timing needs the ranks, not a converged fit (3 fits of 200 sweeps: ~1 min)
                    targets.update(cp_iters=20, verify=1)
                fact = hsvkernels.decompose(w, method, **targets)
                factors = [f.to("cuda", dtype) for f in fact.factors]
                op = lambda: torch.ops.hsv.conv2d(x, factors, None, kw["stride"], kw["padding"],  # noqa: E731
                                                  kw["dilation"], kw["groups"], fact.kind)
                dense = lambda: F.conv2d(x, wd, None, kw["stride"], kw["padding"], kw["dilation"],  # noqa: E731
                                         kw["groups"])
                paths = {"dense": (dense, {}), "composite": (op, {"HSV_CUDA_IMPL": "composite"}),
                         "wmma": (op, {"HSV_CUDA_IMPL": "fused", "HSV_CUDA_NHWC": "wmma"}),
                         "mma": (op, {"HSV_CUDA_IMPL": "fused", "HSV_CUDA_NHWC": "mma"})}
                if args.no_wmma:
                    del paths["wmma"]
                if args.halo_off:
                    paths["mma no-halo"] = (op, {"HSV_CUDA_IMPL": "fused", "HSV_CUDA_NHWC": "mma",
                                                 "HSV_CUDA_MMA_HALO": "0"})
                if args.pack_aten:
                    paths["mma aten-pack"] = (op, {"HSV_CUDA_IMPL": "fused", "HSV_CUDA_NHWC": "mma",
                                                   "HSV_CUDA_PACK": "aten"})
                if args.sweep:
                    for mi in ("1", "2"):
                        for s in ("1", "2", "4"):
                            for ks in ("32", "64"):
                                paths["mma mi%s s%s k%s" % (mi, s, ks)] = (op, {
                                    "HSV_CUDA_IMPL": "fused", "HSV_CUDA_NHWC": "mma", "HSV_CUDA_MMA_MI": mi,
                                    "HSV_CUDA_SPLIT_K": s, "HSV_CUDA_MMA_KSTEP": ks})
                wgmma_envs = {}
                if args.wgmma or args.wgmma_sweep:
                    wgmma_envs["wgmma"] = {"HSV_CUDA_IMPL": "fused", "HSV_CUDA_NHWC": "wgmma"}
                if args.wgmma_sweep:
                    for wg in ("1", "2"):
                        for s in ("1", "2", "4", "8"):
                            wgmma_envs["wgmma wg%s s%s" % (wg, s)] = {
                                "HSV_CUDA_IMPL": "fused", "HSV_CUDA_NHWC": "wgmma", "HSV_CUDA_WGMMA_WG": wg,
                                "HSV_CUDA_SPLIT_K": s}
                paths.update({name: (op, env) for name, env in wgmma_envs.items()})
                fold_env = {"HSV_CUDA_FOLD": "on"} if args.fold else {}
                if args.fold:
                    for env in list(wgmma_envs.values()) + [env for _, env in paths.values()]:
                        if env.get("HSV_CUDA_IMPL") == "fused":
                            env.update(fold_env)
                    paths["unfolded"] = (op, {"HSV_CUDA_IMPL": "fused", "HSV_CUDA_FOLD": "off"})
                kcp_tile = None
                if args.kcp and fact.kind == "kcp":
                    kcp_tile = check_kcp(op, method, shape, batch)
                    if kcp_tile is not None:
                        paths["kcp"] = (op, {"HSV_CUDA_IMPL": "fused", "HSV_CUDA_KCP": "on"})
                with torch.inference_mode():
                    with timing.env_set({"HSV_CUDA_IMPL": "composite"}):
                        y_comp = op()
                    folds = _C.cuda_fold_launch_count()
                    with timing.env_set(dict(HSV_CUDA_IMPL="fused", **fold_env)):
                        y_mma = op()
                    folded = _C.cuda_fold_launch_count() > folds
                    err = layers.normalized_error(y_mma, y_comp)
                    if folded and not err <= 5e-2:   # never time a wrong answer
                        sys.exit("folded %s: %s b%d: error %.3g against the composite chain" % (
                            method, shape.name, batch, err))
                    if args.pack_aten:   # both packings must give the same answer (their packed buffers are equal)
                        os.environ["HSV_CUDA_IMPL"], os.environ["HSV_CUDA_PACK"] = "fused", "aten"
                        factors = [f.clone() for f in factors]   # fresh tensors: no cached packing
                        y_aten = op()
                        os.environ.pop("HSV_CUDA_IMPL")
                        os.environ.pop("HSV_CUDA_PACK")
                        if not torch.equal(y_aten, y_mma):
                            sys.exit("HSV_CUDA_PACK=aten changed the output on %s" % shape.name)
                    for name, env in wgmma_envs.items():   # never time a wrong answer
                        with timing.env_set(env):
                            y_wg = op()
                        wg_err = layers.normalized_error(y_wg, y_comp)
                        if not wg_err <= 5e-2:
                            sys.exit("%s: %s b%d: error %.3g against the composite chain" % (
                                name, shape.name, batch, wg_err))
                    fns, configs = {}, {}
                    for name, (fn, env) in paths.items():
                        fns[name], configs[name] = captured(fn, env, args.reps)
                    times = timing.time_interleaved(fns, min_run_time=args.min_run_time, rounds=3)
                t = {name: times[name]["median"] / args.reps * 1e6 for name in fns}
                # achieved TFLOP/s: 2 x dense MACs for dense, 2 x the factorization's MACs for every other path
                ho, wo = shape.out_hw
                flops = {"dense": 2 * shape.dense_macs(batch), "fact": 2 * batch * fact.macs(ho, wo, shape.h, shape.w)}
                tflops = {name: flops["dense" if name == "dense" else "fact"] / (v * 1e-6) / 1e12
                          for name, v in t.items()}
                best = min((v, k) for k, v in t.items() if k.startswith(("mma", "wgmma")))
                row = dict(layer=shape.name, batch=batch, method=method, times=t, mma_config=configs["mma"],
                           wgmma_config=configs.get("wgmma"), best=best[1], err_vs_composite=err, folded=folded,
                           kcp_tile=kcp_tile, tflops=tflops)
                rows.append(row)
                print("\n%s b%d %s %s: mma vs composite error %.2g, mma config %s%s" % (
                    shape.name, batch, method, "x".join(str(tuple(f.shape)) for f in factors), err, configs["mma"],
                    ", folded" if folded else ""))
                for name, v in t.items():
                    print("  %-18s %9.1f us  /dense %6.3f  /composite %6.3f  %7.1f TFLOP/s  %s" % (
                        name, v, v / t["dense"], v / t["composite"], tflops[name],
                        configs[name] if name.startswith(("mma", "wgmma")) else kcp_tile if name == "kcp" else ""))
    nan = float("nan")
    print("\n| layer | N | method | dense us | composite us | wmma us | mma us | wgmma us | mma/dense | wgmma/dense | "
          "mma/composite | wgmma/mma | mma config | wgmma config | best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["times"]
        wg = t.get("wgmma", nan)
        print("| %s | %d | %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.3f | %.3f | %.3f | %.3f | %s | %s | %s %.1f |" % (
            r["layer"], r["batch"], r["method"], t["dense"], t["composite"], t.get("wmma", nan), t["mma"], wg,
            t["mma"] / t["dense"], wg / t["dense"], t["mma"] / t["composite"], wg / t["mma"], r["mma_config"],
            r["wgmma_config"], r["best"], t[r["best"]]))
    kcp_rows = [r for r in rows if "kcp" in r["times"]]
    if kcp_rows:
        print("\n| layer | N | dense us | composite us | kcp us | kcp/dense | kcp/composite | "
              "kcp tile (h, w, nb, splits, smem) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in kcp_rows:
            t = r["times"]
            print("| %s | %d | %.1f | %.1f | %.1f | %.3f | %.3f | %s |" % (
                r["layer"], r["batch"], t["dense"], t["composite"], t["kcp"], t["kcp"] / t["dense"],
                t["kcp"] / t["composite"], r["kcp_tile"]))


if __name__ == "__main__":
    main()
