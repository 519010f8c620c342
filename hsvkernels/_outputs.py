"""Model inputs and outputs as tensors: CNN heads return a tensor, but segmentation models return dicts
({"out", "aux"}) and others tuples or lists; comparisons and checks walk all of them alike."""
import torch


def leaves(y):
    """The tensors in `y` (a tensor, or dicts/lists/tuples of them), in the order torch's pytree and
    torch.export flatten them (dicts by insertion order); other values are skipped."""
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in leaves(v)]
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in leaves(v)]
    return []


def relative_error(y_hat, y):
    """||y_hat - y|| / ||y|| in float64 over every tensor of two outputs of the same structure, or None
    when they hold no tensors or their tensors' shapes differ (detections with different box counts)."""
    a, b = leaves(y_hat), leaves(y)
    if not b or len(a) != len(b) or any(u.shape != v.shape for u, v in zip(a, b)):
        return None
    # squared norms summed leaf by leaf: no concatenated copy, each leaf stays on its device
    diff_sq = sum(float(torch.linalg.vector_norm(u.detach().double() - v.detach().double()) ** 2)
                  for u, v in zip(a, b))
    ref_sq = sum(float(torch.linalg.vector_norm(v.detach().double()) ** 2) for v in b)
    return diff_sq ** 0.5 / max(ref_sq ** 0.5, 1e-300)


def max_abs_difference(y_hat, y):
    """The largest |y_hat - y| over every tensor of two outputs that relative_error could compare."""
    return max((float((u.detach().double() - v.detach().double()).abs().max()) if u.numel() else 0.0)
               for u, v in zip(leaves(y_hat), leaves(y)))


def check_finite(name, value):
    """ValueError naming `name` if a tensor in `value` (a tensor or a tuple/list/dict of them) holds NaN or Inf."""
    for t in leaves(value):
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            raise ValueError("%s contains NaN or Inf values; errors measured on it would be NaN" % name)
