"""Report: what convert_ did to each conv layer, and the totals.

A report is plain data (rows of numbers and strings) so it can be printed,
written as JSON or Markdown, read back from JSON and plotted. MACs are counted
per image at the example input size; FLOPs would be 2x MACs.
"""
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields

FACTORIZED = "factorized"
DENSE = "dense"


@dataclass
class LayerRow:
    name: str
    shape: tuple                       # dense kernel (Cout, Cin/groups, kh, kw)
    groups: int = 1
    method: str = None                 # decomposition method tried, if any
    meta: dict = field(default_factory=dict)   # what the method chose (ranks, ...)
    params_before: int = 0             # weight + bias
    params_after: int = 0
    macs_before: int = None            # per image; None if the layer did not run on the example input
    macs_after: int = None
    rel_error: float = None            # ||W - W_hat||_F / ||W||_F
    output_error: float = None         # ||y - y_hat|| / ||y|| on the calibration batch
    latency_dense_ms: float = None
    latency_factorized_ms: float = None
    decision: str = DENSE
    reason: str = ""
    folded_bn: str = None              # name of the BatchNorm2d folded into this conv (convert_ fold_bn=True)

    @property
    def compression(self):
        return self.params_before / self.params_after if self.params_after else math.nan

    @property
    def macs_reduction(self):
        if not self.macs_before or not self.macs_after:
            return math.nan
        return self.macs_before / self.macs_after


@dataclass
class Report:
    layers: list = field(default_factory=list)
    method: str = None
    options: dict = field(default_factory=dict)       # ratio/rank and method options as given
    input_size: tuple = None                          # example input shape used for MACs
    model_params_before: int = None                   # every parameter of the model, not only convs
    model_params_after: int = None
    model_output_error: float = None                  # whole model, on the calibration batch (when given)
    notes: list = field(default_factory=list)         # conversion-wide remarks (e.g. why no BN was folded)

    # Totals -------------------------------------------------------------------------
    def _sum(self, attr):
        values = [getattr(r, attr) for r in self.layers]
        return sum(v for v in values if v is not None)

    @property
    def factorized(self):
        return [r for r in self.layers if r.decision == FACTORIZED]

    @property
    def dense(self):
        return [r for r in self.layers if r.decision != FACTORIZED]

    def totals(self):
        """Sums over conv layers (dense rows count the same before and after)."""
        t = {
            "layers": len(self.layers),
            "factorized": len(self.factorized),
            "dense": len(self.dense),
            "params_before": self._sum("params_before"),
            "params_after": self._sum("params_after"),
            "macs_before": self._sum("macs_before"),
            "macs_after": self._sum("macs_after"),
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_output_error": self.model_output_error,
        }
        t["compression"] = t["params_before"] / t["params_after"] if t["params_after"] else math.nan
        t["macs_reduction"] = t["macs_before"] / t["macs_after"] if t["macs_after"] else math.nan
        return t

    def __getitem__(self, name):
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError("no layer %r in this report" % (name,))

    # Serialisation --------------------------------------------------------------------
    def to_dict(self):
        d = {k: v for k, v in asdict(self).items() if k != "layers"}
        d["layers"] = [asdict(r) for r in self.layers]
        d["totals"] = self.totals()
        return d

    def to_json(self, path=None, indent=2):
        """The report as a JSON string; also written to `path` when given."""
        text = json.dumps(_jsonable(self.to_dict()), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(LayerRow)}
        rows = []
        for r in d.get("layers", []):
            r = {k: v for k, v in r.items() if k in names}
            r["shape"] = tuple(r.get("shape", ()))
            rows.append(LayerRow(**r))
        keep = {f.name for f in fields(cls)} - {"layers"}
        kwargs = {k: v for k, v in d.items() if k in keep}
        if kwargs.get("input_size") is not None:
            kwargs["input_size"] = tuple(kwargs["input_size"])
        return cls(layers=rows, **kwargs)

    @classmethod
    def from_json(cls, text_or_path):
        """From a JSON string (as to_json returns) or the path of a file holding one."""
        text = text_or_path
        if not isinstance(text, str) or not text.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    # Text output ----------------------------------------------------------------------
    _COLUMNS = ("layer", "shape", "method", "split/ranks", "params", "after", "ratio", "MACs", "after", "rel.err",
                "out.err", "ms dense", "ms fact", "decision")

    def _cells(self, r):
        return (r.name, "x".join(map(str, r.shape)) + ("/g%d" % r.groups if r.groups != 1 else ""),
                r.method or "-", _ranks(r.meta), _count(r.params_before), _count(r.params_after),
                _num(r.compression, "%.2f"), _count(r.macs_before), _count(r.macs_after),
                _num(r.rel_error, "%.4f"), _num(r.output_error, "%.4f"), _num(r.latency_dense_ms, "%.3f"),
                _num(r.latency_factorized_ms, "%.3f"),
                r.decision + (" +%s folded" % r.folded_bn if r.folded_bn else "")
                + (" (%s)" % r.reason if r.reason else ""))

    def _total_cells(self):
        t = self.totals()
        return ("TOTAL (%d/%d factorized)" % (t["factorized"], t["layers"]), "", self.method or "-", "",
                _count(t["params_before"]), _count(t["params_after"]), _num(t["compression"], "%.2f"),
                _count(t["macs_before"]), _count(t["macs_after"]), "", "", "", "", "")

    def __str__(self):
        rows = [self._COLUMNS] + [self._cells(r) for r in self.layers] + [self._total_cells()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self._COLUMNS))]
        left = {0, 1, 2, 3, len(widths) - 1}   # text columns; numbers are right-aligned

        def line(row):
            return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * len(line(rows[0]))
        out = [line(rows[0]), rule] + [line(r) for r in rows[1:-1]] + [rule, line(rows[-1])]
        t = self.totals()
        if t["model_params_before"] is not None and t["model_params_after"] is not None:
            out.append("model parameters: %s -> %s (%.2fx)" % (
                _count(t["model_params_before"]), _count(t["model_params_after"]),
                t["model_params_before"] / max(t["model_params_after"], 1)))
        if not math.isnan(t["macs_reduction"]):
            size = "x".join(map(str, self.input_size)) if self.input_size else "?"
            out.append("conv MACs per image at input %s: %s -> %s (%.2fx); FLOPs = 2 x MACs" % (
                size, _count(t["macs_before"]), _count(t["macs_after"]), t["macs_reduction"]))
        if self.model_output_error is not None:
            out.append("model output relative error on the calibration batch: %.4f" % self.model_output_error)
        folds = sum(1 for r in self.layers if r.folded_bn)
        if folds:
            out.append("batch norms folded into the conv before them: %d" % folds)
        out.extend("note: %s" % n for n in self.notes)
        return "\n".join(s.rstrip() for s in out)

    def to_markdown(self):
        def row(cells):
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        out = [row(self._COLUMNS), "|" + "|".join("---" for _ in self._COLUMNS) + "|"]
        out += [row(self._cells(r)) for r in self.layers]
        out.append(row(self._total_cells()))
        return "\n".join(out)

    def plot(self, path):
        """Writes a PNG: per-layer parameter compression vs relative reconstruction error."""
        import matplotlib
        matplotlib.use("Agg", force=False)  # no display needed; keeps working over SSH and in CI
        from matplotlib.figure import Figure  # a bare Figure avoids pyplot's global state

        rows = [r for r in self.factorized if r.rel_error is not None]
        fig = Figure(figsize=(8, 5))
        ax = fig.add_subplot(1, 1, 1)
        if rows:
            xs = [r.compression for r in rows]
            ys = [r.rel_error for r in rows]
            ax.scatter(xs, ys, s=18)
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(r.name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        else:
            ax.text(0.5, 0.5, "no factorized layers", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("parameter compression (dense / factorized)")
        ax.set_ylabel("relative reconstruction error ||W - W_hat|| / ||W||")
        t = self.totals()
        ax.set_title("%s: %d/%d conv layers factorized, conv params %.2fx" % (
            self.method or "hsvkernels", t["factorized"], t["layers"], t["compression"]))
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path


def _jsonable(x):
    """JSON-safe copy: tuples to lists, NaN/inf to None, tensors and other objects to lists/str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if hasattr(x, "tolist"):  # tensors, numpy scalars
        return _jsonable(x.tolist())
    return str(x)


def _ranks(meta):
    """The structure a method chose, short: "14" (svd), "split=16x4x4x16,rank=14" (hsv), "R_T=24,R_S=24"."""
    keys = [k for k in meta if _is_structure_key(k, meta[k])]
    if not keys:
        return "-"
    if keys == ["rank"]:
        return str(meta["rank"]).replace(" ", "")
    cells = []
    for k in keys:
        v = meta[k]
        text = "x".join(map(str, v)) if k == "split" and isinstance(v, (tuple, list)) else str(v)
        cells.append("%s=%s" % (k, text.replace(" ", "")))
    return ",".join(cells)


def _is_structure_key(key, value):
    # Ranks are named rank*, R_T/R_S (Tucker), R1/R13/R3 (HT-2) or a (TT); split is HSV/KCP's reshaping.
    if key in ("split", "a") or "rank" in key or re.fullmatch(r"R(_\w+|\d+)", key):
        return True
    return key == "level2" and value is not None


def _count(n):
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return "%.2f%s" % (n / scale, unit)
    return str(n)


def _num(x, fmt):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt % x
