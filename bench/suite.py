"""The fixed layer suite: every distinct conv shape of ResNet-18, ResNet-50 and VGG-16 at 224x224.

CONV_CALLS is written out (one line per conv call in a forward pass), so that
importing the suite needs neither torchvision nor a model; `python bench/suite.py
--check` traces the torchvision models again and fails if the table drifted.
shapes() deduplicates by shape and keeps every (model, layer) that uses a shape,
because timing the same shape twice tells nothing new.

    from bench import suite
    for s in suite.select(models=["resnet18"], channels_min=128): print(s.name, s.cin, s.cout)
"""
import argparse
import fnmatch
import math
import sys
from dataclasses import dataclass
from functools import lru_cache

MODELS = ("resnet18", "resnet50", "vgg16")
INPUT_HW = (224, 224)

# (model, layer, Cin, Cout, kh, kw, stride, padding, dilation, groups, input H, input W),
# in forward order; from trace_torchvision() with torchvision 0.29.1.
CONV_CALLS = (
    ("resnet18", "conv1", 3, 64, 7, 7, 2, 3, 1, 1, 224, 224),
    ("resnet18", "layer1.0.conv1", 64, 64, 3, 3, 1, 1, 1, 1, 56, 56),
    ("resnet18", "layer1.0.conv2", 64, 64, 3, 3, 1, 1, 1, 1, 56, 56),
    ("resnet18", "layer1.1.conv1", 64, 64, 3, 3, 1, 1, 1, 1, 56, 56),
    ("resnet18", "layer1.1.conv2", 64, 64, 3, 3, 1, 1, 1, 1, 56, 56),
    ("resnet18", "layer2.0.conv1", 64, 128, 3, 3, 2, 1, 1, 1, 56, 56),
    ("resnet18", "layer2.0.conv2", 128, 128, 3, 3, 1, 1, 1, 1, 28, 28),
    ("resnet18", "layer2.0.downsample.0", 64, 128, 1, 1, 2, 0, 1, 1, 56, 56),
    ("resnet18", "layer2.1.conv1", 128, 128, 3, 3, 1, 1, 1, 1, 28, 28),
    ("resnet18", "layer2.1.conv2", 128, 128, 3, 3, 1, 1, 1, 1, 28, 28),
    ("resnet18", "layer3.0.conv1", 128, 256, 3, 3, 2, 1, 1, 1, 28, 28),
    ("resnet18", "layer3.0.conv2", 256, 256, 3, 3, 1, 1, 1, 1, 14, 14),
    ("resnet18", "layer3.0.downsample.0", 128, 256, 1, 1, 2, 0, 1, 1, 28, 28),
    ("resnet18", "layer3.1.conv1", 256, 256, 3, 3, 1, 1, 1, 1, 14, 14),
    ("resnet18", "layer3.1.conv2", 256, 256, 3, 3, 1, 1, 1, 1, 14, 14),
    ("resnet18", "layer4.0.conv1", 256, 512, 3, 3, 2, 1, 1, 1, 14, 14),
    ("resnet18", "layer4.0.conv2", 512, 512, 3, 3, 1, 1, 1, 1, 7, 7),
    ("resnet18", "layer4.0.downsample.0", 256, 512, 1, 1, 2, 0, 1, 1, 14, 14),
    ("resnet18", "layer4.1.conv1", 512, 512, 3, 3, 1, 1, 1, 1, 7, 7),
    ("resnet18", "layer4.1.conv2", 512, 512, 3, 3, 1, 1, 1, 1, 7, 7),
    ("resnet50", "conv1", 3, 64, 7, 7, 2, 3, 1, 1, 224, 224),
    ("resnet50", "layer1.0.conv1", 64, 64, 1, 1, 1, 0, 1, 1, 56, 56),
    ("resnet50", "layer1.0.conv2", 64, 64, 3, 3, 1, 1, 1, 1, 56, 56),
    ("resnet50", "layer1.0.conv3", 64, 256, 1, 1, 1, 0, 1, 1, 56, 56),
    ("resnet50", "layer1.0.downsample.0", 64, 256, 1, 1, 1, 0, 1, 1, 56, 56),
    ("resnet50", "layer1.1.conv1", 256, 64, 1, 1, 1, 0, 1, 1, 56, 56),
    ("resnet50", "layer1.1.conv2", 64, 64, 3, 3, 1, 1, 1, 1, 56, 56),
    ("resnet50", "layer1.1.conv3", 64, 256, 1, 1, 1, 0, 1, 1, 56, 56),
    ("resnet50", "layer1.2.conv1", 256, 64, 1, 1, 1, 0, 1, 1, 56, 56),
    ("resnet50", "layer1.2.conv2", 64, 64, 3, 3, 1, 1, 1, 1, 56, 56),
    ("resnet50", "layer1.2.conv3", 64, 256, 1, 1, 1, 0, 1, 1, 56, 56),
    ("resnet50", "layer2.0.conv1", 256, 128, 1, 1, 1, 0, 1, 1, 56, 56),
    ("resnet50", "layer2.0.conv2", 128, 128, 3, 3, 2, 1, 1, 1, 56, 56),
    ("resnet50", "layer2.0.conv3", 128, 512, 1, 1, 1, 0, 1, 1, 28, 28),
    ("resnet50", "layer2.0.downsample.0", 256, 512, 1, 1, 2, 0, 1, 1, 56, 56),
    ("resnet50", "layer2.1.conv1", 512, 128, 1, 1, 1, 0, 1, 1, 28, 28),
    ("resnet50", "layer2.1.conv2", 128, 128, 3, 3, 1, 1, 1, 1, 28, 28),
    ("resnet50", "layer2.1.conv3", 128, 512, 1, 1, 1, 0, 1, 1, 28, 28),
    ("resnet50", "layer2.2.conv1", 512, 128, 1, 1, 1, 0, 1, 1, 28, 28),
    ("resnet50", "layer2.2.conv2", 128, 128, 3, 3, 1, 1, 1, 1, 28, 28),
    ("resnet50", "layer2.2.conv3", 128, 512, 1, 1, 1, 0, 1, 1, 28, 28),
    ("resnet50", "layer2.3.conv1", 512, 128, 1, 1, 1, 0, 1, 1, 28, 28),
    ("resnet50", "layer2.3.conv2", 128, 128, 3, 3, 1, 1, 1, 1, 28, 28),
    ("resnet50", "layer2.3.conv3", 128, 512, 1, 1, 1, 0, 1, 1, 28, 28),
    ("resnet50", "layer3.0.conv1", 512, 256, 1, 1, 1, 0, 1, 1, 28, 28),
    ("resnet50", "layer3.0.conv2", 256, 256, 3, 3, 2, 1, 1, 1, 28, 28),
    ("resnet50", "layer3.0.conv3", 256, 1024, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer3.0.downsample.0", 512, 1024, 1, 1, 2, 0, 1, 1, 28, 28),
    ("resnet50", "layer3.1.conv1", 1024, 256, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer3.1.conv2", 256, 256, 3, 3, 1, 1, 1, 1, 14, 14),
    ("resnet50", "layer3.1.conv3", 256, 1024, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer3.2.conv1", 1024, 256, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer3.2.conv2", 256, 256, 3, 3, 1, 1, 1, 1, 14, 14),
    ("resnet50", "layer3.2.conv3", 256, 1024, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer3.3.conv1", 1024, 256, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer3.3.conv2", 256, 256, 3, 3, 1, 1, 1, 1, 14, 14),
    ("resnet50", "layer3.3.conv3", 256, 1024, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer3.4.conv1", 1024, 256, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer3.4.conv2", 256, 256, 3, 3, 1, 1, 1, 1, 14, 14),
    ("resnet50", "layer3.4.conv3", 256, 1024, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer3.5.conv1", 1024, 256, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer3.5.conv2", 256, 256, 3, 3, 1, 1, 1, 1, 14, 14),
    ("resnet50", "layer3.5.conv3", 256, 1024, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer4.0.conv1", 1024, 512, 1, 1, 1, 0, 1, 1, 14, 14),
    ("resnet50", "layer4.0.conv2", 512, 512, 3, 3, 2, 1, 1, 1, 14, 14),
    ("resnet50", "layer4.0.conv3", 512, 2048, 1, 1, 1, 0, 1, 1, 7, 7),
    ("resnet50", "layer4.0.downsample.0", 1024, 2048, 1, 1, 2, 0, 1, 1, 14, 14),
    ("resnet50", "layer4.1.conv1", 2048, 512, 1, 1, 1, 0, 1, 1, 7, 7),
    ("resnet50", "layer4.1.conv2", 512, 512, 3, 3, 1, 1, 1, 1, 7, 7),
    ("resnet50", "layer4.1.conv3", 512, 2048, 1, 1, 1, 0, 1, 1, 7, 7),
    ("resnet50", "layer4.2.conv1", 2048, 512, 1, 1, 1, 0, 1, 1, 7, 7),
    ("resnet50", "layer4.2.conv2", 512, 512, 3, 3, 1, 1, 1, 1, 7, 7),
    ("resnet50", "layer4.2.conv3", 512, 2048, 1, 1, 1, 0, 1, 1, 7, 7),
    ("vgg16", "features.0", 3, 64, 3, 3, 1, 1, 1, 1, 224, 224),
    ("vgg16", "features.2", 64, 64, 3, 3, 1, 1, 1, 1, 224, 224),
    ("vgg16", "features.5", 64, 128, 3, 3, 1, 1, 1, 1, 112, 112),
    ("vgg16", "features.7", 128, 128, 3, 3, 1, 1, 1, 1, 112, 112),
    ("vgg16", "features.10", 128, 256, 3, 3, 1, 1, 1, 1, 56, 56),
    ("vgg16", "features.12", 256, 256, 3, 3, 1, 1, 1, 1, 56, 56),
    ("vgg16", "features.14", 256, 256, 3, 3, 1, 1, 1, 1, 56, 56),
    ("vgg16", "features.17", 256, 512, 3, 3, 1, 1, 1, 1, 28, 28),
    ("vgg16", "features.19", 512, 512, 3, 3, 1, 1, 1, 1, 28, 28),
    ("vgg16", "features.21", 512, 512, 3, 3, 1, 1, 1, 1, 28, 28),
    ("vgg16", "features.24", 512, 512, 3, 3, 1, 1, 1, 1, 14, 14),
    ("vgg16", "features.26", 512, 512, 3, 3, 1, 1, 1, 1, 14, 14),
    ("vgg16", "features.28", 512, 512, 3, 3, 1, 1, 1, 1, 14, 14),
)

# The eight shapes of docs/performance.md §3.3, so that reports can use the same names.
DOC_TAGS = {
    "L1": ("resnet18", "layer1.0.conv1"),
    "L2": ("resnet18", "layer2.1.conv1"),
    "L3": ("resnet18", "layer3.1.conv1"),
    "L4": ("resnet18", "layer4.1.conv1"),
    "L5": ("resnet50", "layer2.0.conv2"),
    "L6": ("resnet50", "layer3.0.conv3"),
    "L7": ("vgg16", "features.2"),
    "L8": ("vgg16", "features.19"),
}


def _out(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@dataclass(frozen=True)
class ConvShape:
    """One distinct conv shape; `name` is its first use, `uses` all of them ("model.layer")."""

    name: str
    cin: int
    cout: int
    kh: int
    kw: int
    stride: int
    padding: int
    dilation: int
    groups: int
    h: int
    w: int
    uses: tuple = ()
    tags: tuple = ()

    @property
    def models(self):
        return tuple(sorted({u.split(".", 1)[0] for u in self.uses}))

    @property
    def out_hw(self):
        return (_out(self.h, self.kh, self.stride, self.padding, self.dilation),
                _out(self.w, self.kw, self.stride, self.padding, self.dilation))

    @property
    def weight_shape(self):
        return (self.cout, self.cin // self.groups, self.kh, self.kw)

    @property
    def dense_params(self):
        return math.prod(self.weight_shape)

    def dense_macs(self, batch=1):
        """Multiply-accumulates of the dense conv for `batch` images."""
        ho, wo = self.out_hw
        return batch * self.dense_params * ho * wo

    def conv_kwargs(self):
        """stride/padding/dilation/groups as F.conv2d takes them."""
        return dict(stride=(self.stride,) * 2, padding=(self.padding,) * 2, dilation=(self.dilation,) * 2,
                    groups=self.groups)

    def describe(self):
        ho, wo = self.out_hw
        return "%d->%d %dx%d s%d p%d d%d %dx%d->%dx%d" % (self.cin, self.cout, self.kh, self.kw, self.stride,
                                                        self.padding, self.dilation, self.h, self.w, ho, wo)

    def as_dict(self):
        ho, wo = self.out_hw
        return dict(layer=self.name, cin=self.cin, cout=self.cout, kh=self.kh, kw=self.kw, stride=self.stride,
                    padding=self.padding, dilation=self.dilation, groups=self.groups, h=self.h, w=self.w,
                    ho=ho, wo=wo, uses=list(self.uses), models=list(self.models), tags=list(self.tags))


def _key(call):
    return call[2:]   # everything but model and layer name


@lru_cache(maxsize=None)
def shapes():
    """The deduplicated suite, in first-use order (ResNet-18, then ResNet-50, then VGG-16)."""
    tag_of = {"%s.%s" % use: tag for tag, use in DOC_TAGS.items()}
    order, uses = [], {}
    for call in CONV_CALLS:
        k = _key(call)
        if k not in uses:
            order.append(k)
            uses[k] = []
        uses[k].append("%s.%s" % call[:2])
    out = []
    for k in order:
        cin, cout, kh, kw, stride, padding, dilation, groups, h, w = k
        tags = tuple(sorted(tag_of[u] for u in uses[k] if u in tag_of))
        out.append(ConvShape(uses[k][0], cin, cout, kh, kw, stride, padding, dilation, groups, h, w,
                             tuple(uses[k]), tags))
    return tuple(out)


def parse_shape(text, name=None):
    """A custom shape "Cin,Cout,kh,kw,stride,padding,dilation,H,W" (for ad-hoc and smoke runs)."""
    try:
        cin, cout, kh, kw, stride, padding, dilation, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("shape must be Cin,Cout,kh,kw,stride,padding,dilation,H,W; got %r"
                                         % text) from None
    name = name or "custom.%s" % text.replace(",", "_")
    return ConvShape(name, cin, cout, kh, kw, stride, padding, dilation, 1, h, w, (name,), ())


def select(models=None, channels_min=None, channels_max=None, kernel=None, stride=None, names=None, tags=None,
           limit=None, suite=None):
    """The suite entries that pass every given filter.

    models: keep shapes used by any of these models. channels_min/max: bounds on
    min(Cin, Cout) / max(Cin, Cout). kernel: kh (square kernels). names: fnmatch
    patterns matched against every use ("resnet18.layer3.*"). tags: doc tags ("L3").
    """
    out = []
    for s in (shapes() if suite is None else suite):
        if models and not set(models) & set(s.models):
            continue
        if channels_min is not None and min(s.cin, s.cout) < channels_min:
            continue
        if channels_max is not None and max(s.cin, s.cout) > channels_max:
            continue
        if kernel is not None and (s.kh, s.kw) != (kernel, kernel):
            continue
        if stride is not None and s.stride != stride:
            continue
        if names and not any(fnmatch.fnmatchcase(u, p) for u in s.uses for p in names):
            continue
        if tags and not set(tags) & set(s.tags):
            continue
        out.append(s)
    return out[:limit] if limit else out


def _csv(text):
    return [v for v in text.split(",") if v]


def add_filter_args(parser):
    """The suite filters as command-line options, shared by the benchmark scripts."""
    g = parser.add_argument_group("layer selection")
    g.add_argument("--model", type=_csv, help="comma list of models: %s" % ",".join(MODELS))
    g.add_argument("--channels-min", type=int, help="keep layers with min(Cin, Cout) >= this")
    g.add_argument("--channels-max", type=int, help="keep layers with max(Cin, Cout) <= this")
    g.add_argument("--kernel", type=int, help="keep kxk layers only (e.g. 3, or 1)")
    g.add_argument("--stride", type=int, help="keep layers with this stride")
    g.add_argument("--layers", type=_csv, help="comma list of fnmatch patterns on 'model.layer' names")
    g.add_argument("--tags", type=_csv, help="comma list of docs/performance.md tags (L1..L8)")
    g.add_argument("--limit", type=int, help="keep the first N layers after filtering")
    g.add_argument("--shape", action="append", type=parse_shape, default=[],
                   help="add a custom layer Cin,Cout,kh,kw,stride,padding,dilation,H,W (repeatable; "
                        "given alone, only custom layers run)")
    return parser


def select_from_args(args):
    filters = dict(models=args.model, channels_min=args.channels_min, channels_max=args.channels_max,
                   kernel=args.kernel, stride=args.stride, names=args.layers, tags=args.tags)
    custom = list(args.shape)
    if custom and not any(v is not None for v in filters.values()):
        return custom[:args.limit] if args.limit else custom
    return select(**filters, limit=args.limit) + custom


def trace_torchvision(models=MODELS, input_hw=INPUT_HW):
    """CONV_CALLS as traced now: forward hooks on torchvision models built on the meta device."""
    import torch
    import torchvision

    calls = []
    for model_name in models:
        with torch.device("meta"):   # no weights allocated, no download, no compute
            model = getattr(torchvision.models, model_name)(weights=None)
        hooks = []
        for fqn, mod in model.named_modules():
            if isinstance(mod, torch.nn.Conv2d):
                def hook(mod, inputs, output, fqn=fqn):
                    assert len(set(mod.stride)) == len(set(mod.padding)) == len(set(mod.dilation)) == 1, fqn
                    calls.append((model_name, fqn, mod.in_channels, mod.out_channels, *mod.kernel_size,
                                  mod.stride[0], mod.padding[0], mod.dilation[0], mod.groups,
                                  *inputs[0].shape[2:]))
                hooks.append(mod.register_forward_hook(hook))
        model(torch.empty(1, 3, *input_hw, device="meta"))
        for h in hooks:
            h.remove()
    return tuple(calls)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print the layer suite (after filters), or check it.")
    add_filter_args(parser)
    parser.add_argument("--check", action="store_true", help="re-trace torchvision and compare with CONV_CALLS")
    args = parser.parse_args(argv)
    if args.check:
        traced = trace_torchvision()
        if traced != CONV_CALLS:
            missing = set(traced) ^ set(CONV_CALLS)
            print("suite.py: CONV_CALLS differs from the torchvision trace; %d differing calls, e.g. %s"
                  % (len(missing), sorted(missing)[:3]), file=sys.stderr)
            return 1
        print("CONV_CALLS matches the torchvision trace: %d conv calls, %d distinct shapes"
              % (len(traced), len(shapes())))
        return 0
    rows = select_from_args(args)
    print("%-28s %-5s %-32s %9s %12s  %s" % ("layer", "tags", "shape", "params", "MMAC/img", "uses"))
    for s in rows:
        print("%-28s %-5s %-32s %9d %12.1f  %d: %s" % (s.name, ",".join(s.tags), s.describe(), s.dense_params,
                                                     s.dense_macs() / 1e6, len(s.uses), " ".join(s.uses)))
    print("%d layers" % len(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
