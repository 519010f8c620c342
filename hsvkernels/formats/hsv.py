"""kind "hsv": HSV-2, a sum of P Kronecker products with merged factors (docs/methods.md §2.2-2.3).

With Cout = T1*T2 and Cin = S1*S2, the kernel is
    W[t1*T2 + t2, s1*S2 + s2, i, j] = sum_p A[t1, s1, p] * B[p, t2, s2, i, j].

Factor layouts (the factor count and factor 0's rank say which levels are present):
    [B (P, T2, S2, kh, kw), A (T1, S1, P)]                          level 1
    [B1 (q1, S2, kh, kw), B2 (P, T2, q1), A (T1, S1, P)]            B = B2 @ B1 (rank q1)
    [B (P, T2, S2, kh, kw), A1 (q2, S1, P), A2 (T1, q2)]            A = A2 @ A1 (rank q2)
    [B1 (q1, S2, kh, kw), B2 (P, T2, q1), A1 (q2, S1, P), A2 (T1, q2)]  both
B and A are stored with the split sizes as separate dimensions, so every split
number comes from the factor shapes alone (to_dense and the cost formulas need no
input). In memory they are exactly the merged matrices: B is the conv weight
(P*T2, S2, kh, kw) and A the GEMM weight (T1, S1*P) with columns ordered (s1, p).

The op runs (no permutes, every activation change is a view):
    x (N, Cin, H, W) -> (N*S1, S2, H, W) -conv B-> (N*S1, P*T2, Ho, Wo)
      -> (N, S1*P, T2*Ho, Wo) -1x1 conv A-> (N, T1, T2*Ho, Wo) -> (N, T1*T2, Ho, Wo)
with B's conv split into kh x kw S2->q1 and 1x1 q1->P*T2, and A's GEMM into
S1*P->q2 and q2->T1, where level 2 is present.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .base import Format, KernelShape, as_shape

LAYOUTS = ("[B (P, T2, S2, kh, kw), A (T1, S1, P)], [B1 (q1, S2, kh, kw), B2 (P, T2, q1), A (T1, S1, P)], "
           "[B (P, T2, S2, kh, kw), A1 (q2, S1, P), A2 (T1, q2)] or "
           "[B1 (q1, S2, kh, kw), B2 (P, T2, q1), A1 (q2, S1, P), A2 (T1, q2)]")


@dataclass(frozen=True)
class Layout:
    """The sizes of one hsv factor list; q1/q2 are None where that level-2 split is absent."""
    T1: int
    S1: int
    T2: int
    S2: int
    P: int
    kh: int
    kw: int
    q1: Optional[int] = None
    q2: Optional[int] = None

    @property
    def a_index(self):
        """Where the A part starts in the factor list."""
        return 1 if self.q1 is None else 2


class HSV(Format):
    kind = "hsv"
    factor_names = ("B (P, T2, S2, kh, kw)", "A (T1, S1, P)")

    def layout(self, shapes):
        """Checks the factor shapes and returns their Layout."""
        shapes = [tuple(s) for s in shapes]
        if not 2 <= len(shapes) <= 4:
            raise self.error("expected 2 to 4 factors, one of %s; got %d" % (LAYOUTS, len(shapes)))
        for i, s in enumerate(shapes):
            if min(s, default=0) <= 0:
                raise self.error("factors[%d] has an empty dimension: %s" % (i, s))
        split_b = len(shapes[0]) == 4
        if len(shapes[0]) != 5 and not split_b:
            raise self.error("factors[0] must be B (P, T2, S2, kh, kw) or B1 (q1, S2, kh, kw), got shape %s"
                             % (shapes[0],))
        a_at = 2 if split_b else 1
        if not 1 <= len(shapes) - a_at <= 2:
            raise self.error("expected %s; got %d factors with factors[0] of shape %s"
                             % (LAYOUTS, len(shapes), shapes[0]))
        q1 = None
        if split_b:
            (q1, S2, kh, kw), b2 = shapes[0], shapes[1]
            if len(b2) != 3 or b2[2] != q1:
                raise self.error("factors[1] (B2) must be (P, T2, q1) with q1 = %d from factors[0] (B1), got shape %s"
                                 % (q1, b2))
            P, T2 = b2[0], b2[1]
        else:
            P, T2, S2, kh, kw = shapes[0]
        q2 = None
        if len(shapes) - a_at == 2:
            a1, a2 = shapes[a_at], shapes[a_at + 1]
            if len(a1) != 3 or a1[2] != P:
                raise self.error("factors[%d] (A1) must be (q2, S1, P) with P = %d, got shape %s" % (a_at, P, a1))
            q2, S1 = a1[0], a1[1]
            if len(a2) != 2 or a2[1] != q2:
                raise self.error("factors[%d] (A2) must be (T1, q2) with q2 = %d from factors[%d] (A1), got shape %s"
                                 % (a_at + 1, q2, a_at, a2))
            T1 = a2[0]
        else:
            a = shapes[a_at]
            if len(a) != 3 or a[2] != P:
                raise self.error("factors[%d] (A) must be (T1, S1, P) with P = %d Kronecker terms, got shape %s"
                                 % (a_at, P, a))
            T1, S1 = a[0], a[1]
        return Layout(T1, S1, T2, S2, P, kh, kw, q1, q2)

    def kernel_shape(self, shapes):
        lay = self.layout(shapes)
        return KernelShape(lay.T1 * lay.T2, lay.S1 * lay.S2, lay.kh, lay.kw)

    def merged(self, factors):
        """(B, A) of level 1, multiplying out the level-2 factors where present."""
        lay = self.layout([f.shape for f in factors])
        if lay.q1 is None:
            b = factors[0]
        else:
            b1, b2 = factors[0], factors[1]
            b = (b2.reshape(-1, lay.q1) @ b1.reshape(lay.q1, -1)).reshape(lay.P, lay.T2, lay.S2, lay.kh, lay.kw)
        if lay.q2 is None:
            a = factors[lay.a_index]
        else:
            a1, a2 = factors[lay.a_index], factors[lay.a_index + 1]
            a = (a2 @ a1.reshape(lay.q2, -1)).reshape(lay.T1, lay.S1, lay.P)
        return b, a

    def to_dense(self, factors):
        lay = self.layout([f.shape for f in factors])
        b, a = self.merged(factors)
        w = torch.einsum("xsp,pyzij->xyszij", a, b)
        return w.reshape(lay.T1 * lay.T2, lay.S1 * lay.S2, lay.kh, lay.kw)

    def chain(self, x, factors, stride, padding, dilation):
        lay = self.layout([f.shape for f in factors])
        n, _, h, w = x.shape
        z = as_shape(x, n * lay.S1, lay.S2, h, w)
        if lay.q1 is None:
            z = F.conv2d(z, factors[0].reshape(lay.P * lay.T2, lay.S2, lay.kh, lay.kw), None, stride, padding,
                         dilation)
        else:
            z = F.conv2d(z, factors[0], None, stride, padding, dilation)
            z = F.conv2d(z, factors[1].reshape(lay.P * lay.T2, lay.q1, 1, 1))
        ho, wo = z.shape[2], z.shape[3]
        z = as_shape(z, n, lay.S1 * lay.P, lay.T2 * ho, wo)
        if lay.q2 is None:
            z = F.conv2d(z, factors[lay.a_index].reshape(lay.T1, lay.S1 * lay.P, 1, 1))
        else:
            z = F.conv2d(z, factors[lay.a_index].reshape(lay.q2, lay.S1 * lay.P, 1, 1))
            z = F.conv2d(z, factors[lay.a_index + 1][:, :, None, None])
        return as_shape(z, n, lay.T1 * lay.T2, ho, wo)

    def stage_macs(self, shapes, in_hw, out_hw):
        lay = self.layout(shapes)
        positions = out_hw[0] * out_hw[1]
        k2 = lay.kh * lay.kw
        # Stage 1 runs once per input-channel group s1, stage 2 once per t2: all at the output size.
        if lay.q1 is None:
            macs = [lay.S1 * lay.P * lay.T2 * lay.S2 * k2 * positions]
        else:
            macs = [lay.S1 * lay.q1 * lay.S2 * k2 * positions, lay.S1 * lay.P * lay.T2 * lay.q1 * positions]
        if lay.q2 is None:
            macs.append(lay.T2 * lay.T1 * lay.S1 * lay.P * positions)
        else:
            macs += [lay.T2 * lay.q2 * lay.S1 * lay.P * positions, lay.T2 * lay.T1 * lay.q2 * positions]
        return macs
