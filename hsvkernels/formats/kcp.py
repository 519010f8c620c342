"""kind "kcp": 2nd-order Kronecker CP of a conv kernel (KCP-FGTD, methods.md §3.3).

    W[(t1,t2), (s1,s2), i, j] = sum_n  B_n[t1, s1] * A_n[t2, s2, i, j]
    B_n[t1, s1]       = sum_q bt[t1, q, n] bs[q, n, s1]                       (rank Q)
    A_n[t2, s2, i, j] = sum_r at[n, t2, r] as[n, r, s2] ah[n, r, i] aw[n, r, j]  (CP rank R)

with t = t1*T2 + t2 and s = s1*S2 + s2 (row-major Kronecker order). N is the KT
rank. Unlike the notation of methods.md, the channel-only factor B_n sits on the
outer Kronecker side and the spatial factor A_n on the inner side: only that way
round can every activation change of the chain be a reshape (see kind_kcp.cpp).

factors, in stage order:
    bs (Q, N, S1), as (N, R, S2), ah (N, R, kh), aw (N, R, kw), at (N, T2, R), bt (T1, Q, N)
Stages (each weight a reshape of one factor):
    0  1x1 conv S1 -> Q*N on x viewed (B, S1, S2*H, W)           at the input resolution
    1  1x1 conv, N groups, S2 -> R, on (B*Q, N*S2, H, W)          at the input resolution
    2  kh x 1 depthwise on (B*Q, N*R, H, W), the layer's height stride/padding/dilation
    3  1 x kw depthwise, the layer's width stride/padding/dilation
    4  1x1 conv, N groups, R -> T2                               (contract r)
    5  1x1 conv Q*N -> T1 on (B, Q*N, T2*H', W')                 (contract q and n)
This is the four-layer structure of §3.3 with L2 (s and kh) and L4 (r and (n, q))
each run as one stage per CP factor, so that weights stay views of the factors.

Merged form (5 factors): the last two contractions as one GEMM, factors
    bs, as, ah, aw, M (Cout, Q, N, R),  M[(t1,t2), q, n, r] = bt[t1, q, n] at[n, t2, r]
and stage 4 is one dense 1x1 conv Q*N*R -> Cout on (B, Q*N*R, H', W'). It costs
Cout*Q*N*R parameters instead of N*(T2*R + T1*Q), for one fewer, denser GEMM.

All ranks and the input split come from the factor shapes (S1, S2 from bs and as,
so Cin = S1*S2); T1, T2 from bt and at (merged: only Cout is needed).
"""
import torch
import torch.nn.functional as F

from .base import Format, KernelShape, as_shape

NAMES = ("bs (Q, N, S1)", "as (N, R, S2)", "ah (N, R, kh)", "aw (N, R, kw)", "at (N, T2, R)", "bt (T1, Q, N)")
MERGED_NAMES = NAMES[:4] + ("M (Cout, Q, N, R)",)


def dims(shapes):
    """Named sizes of a kcp factor list (shapes already checked): dict with N, R, Q, S1, S2, kh, kw, T1, T2, Cout.

    T1 and T2 are None in the merged form.
    """
    (q, n, s1), (_, r, s2), (_, _, kh), (_, _, kw) = shapes[:4]
    if len(shapes) == 5:
        t1 = t2 = None
        cout = shapes[4][0]
    else:
        t2, t1 = shapes[4][1], shapes[5][0]
        cout = t1 * t2
    return dict(N=n, R=r, Q=q, S1=s1, S2=s2, kh=kh, kw=kw, T1=t1, T2=t2, Cout=cout)


class KCP(Format):
    kind = "kcp"
    factor_names = NAMES

    def expect_factor_count(self, shapes):
        if len(shapes) not in (5, 6):
            raise self.error("expected 6 factors [%s] or 5 (merged) [%s], got %d"
                             % (", ".join(NAMES), ", ".join(MERGED_NAMES), len(shapes)))

    def kernel_shape(self, shapes):
        self.expect_factor_count(shapes)
        shapes = [tuple(s) for s in shapes]
        names = MERGED_NAMES if len(shapes) == 5 else NAMES
        for f, s in enumerate(shapes):
            want = 4 if (len(shapes) == 5 and f == 4) else 3
            if len(s) != want:
                raise self.error("factors[%d] (%s) must be %d-D, got shape %s" % (f, names[f], want, s))
            if min(s) <= 0:
                raise self.error("factors[%d] (%s) has an empty dimension: %s" % (f, names[f], s))
        q, n, s1 = shapes[0]
        r = shapes[1][1]
        for f in (1, 2, 3):
            if shapes[f][:2] != (n, r):
                raise self.error("factors[%d] (%s) has shape %s but factors[0] and factors[1] give N = %d, R = %d"
                                 % (f, names[f], shapes[f], n, r))
        if len(shapes) == 5:
            if shapes[4][1:] != (q, n, r):
                raise self.error("factors[4] (%s) has shape %s, expected (Cout, %d, %d, %d)"
                                 % (names[4], shapes[4], q, n, r))
        else:
            if shapes[4][0] != n or shapes[4][2] != r:
                raise self.error("factors[4] (%s) has shape %s, expected (%d, T2, %d)" % (names[4], shapes[4], n, r))
            if shapes[5][1:] != (q, n):
                raise self.error("factors[5] (%s) has shape %s, expected (T1, %d, %d)" % (names[5], shapes[5], q, n))
        d = dims(shapes)
        return KernelShape(d["Cout"], d["S1"] * d["S2"], d["kh"], d["kw"])

    @staticmethod
    def merge(at, bt):
        """M (Cout, Q, N, R) of the merged form from at (N, T2, R) and bt (T1, Q, N)."""
        t1, q, n = bt.shape
        t2, r = at.shape[1], at.shape[2]
        return torch.einsum("aqn,nbr->abqnr", bt, at).reshape(t1 * t2, q, n, r)

    def to_dense(self, factors):
        bs, as_, ah, aw = factors[:4]
        m = factors[4] if len(factors) == 5 else self.merge(factors[4], factors[5])
        q, n, s1 = bs.shape
        s2, kh, kw = as_.shape[2], ah.shape[2], aw.shape[2]
        spatial = torch.einsum("nrs,nri,nrj->nrsij", as_, ah, aw)          # (N, R, S2, kh, kw)
        partial = torch.einsum("tqnr,nrsij->tqnsij", m, spatial)           # sum over r
        w = torch.einsum("tqnsij,qnc->tcsij", partial, bs)                 # sum over q and n
        return w.reshape(m.shape[0], s1 * s2, kh, kw)

    def chain(self, x, factors, stride, padding, dilation):
        bs, as_, ah, aw = factors[:4]
        q, n, s1 = bs.shape
        r, s2, kh, kw = as_.shape[1], as_.shape[2], ah.shape[2], aw.shape[2]
        b, _, h, w = x.shape
        z = F.conv2d(x.reshape(b, s1, s2 * h, w), bs.reshape(q * n, s1, 1, 1))
        z = F.conv2d(z.reshape(b * q, n * s2, h, w), as_.reshape(n * r, s2, 1, 1), groups=n)
        z = F.conv2d(z, ah.reshape(n * r, 1, kh, 1), None, (stride[0], 1), (padding[0], 0), (dilation[0], 1),
                     groups=n * r)
        z = F.conv2d(z, aw.reshape(n * r, 1, 1, kw), None, (1, stride[1]), (0, padding[1]), (1, dilation[1]),
                     groups=n * r)
        ho, wo = z.shape[2], z.shape[3]
        if len(factors) == 5:
            m = factors[4]
            return F.conv2d(as_shape(z, b, q * n * r, ho, wo), m.reshape(m.shape[0], q * n * r, 1, 1))
        at, bt = factors[4], factors[5]
        t2, t1 = at.shape[1], bt.shape[0]
        z = F.conv2d(z, at.reshape(n * t2, r, 1, 1), groups=n)
        z = F.conv2d(as_shape(z, b, q * n, t2 * ho, wo), bt.reshape(t1, q * n, 1, 1))
        return as_shape(z, b, t1 * t2, ho, wo)

    def stage_macs(self, shapes, in_hw, out_hw):
        d = dims([tuple(s) for s in shapes])
        n, r, q = d["N"], d["R"], d["Q"]
        (h, w), (ho, wo) = in_hw, out_hw
        macs = [q * n * d["S1"] * d["S2"] * h * w,        # 0: S1 -> Q*N on S2*H*W positions
                q * n * r * d["S2"] * h * w,              # 1: grouped S2 -> R, Q in the batch
                q * n * r * d["kh"] * ho * w,             # 2: kh x 1 depthwise, height already reduced
                q * n * r * d["kw"] * ho * wo]            # 3: 1 x kw depthwise
        if len(shapes) == 5:
            macs.append(d["Cout"] * q * n * r * ho * wo)
        else:
            macs += [q * n * d["T2"] * r * ho * wo, d["T1"] * q * n * d["T2"] * ho * wo]
        return macs
