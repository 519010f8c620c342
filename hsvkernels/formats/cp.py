"""kind "cp": CP-4 (Lebedev et al. 2015), W[t,s,i,j] = sum_r A_T[t,r] A_S[r,s] A_h[r,i] A_w[r,j].

factors = [A_S (R, Cin), A_h (R, kh), A_w (R, kw), A_T (Cout, R)]: a 1x1 conv
Cin -> R, a depthwise kh x 1 conv, a depthwise 1 x kw conv and a 1x1 conv R -> Cout.
The layer's stride, padding and dilation are split per axis between the two
depthwise convs (height on the first, width on the second), which keeps the chain
exact for non-square kernels, asymmetric padding pairs and strides.
"""
import torch
import torch.nn.functional as F

from .base import Format, KernelShape


class CP(Format):
    kind = "cp"
    factor_names = ("A_S (R, Cin)", "A_h (R, kh)", "A_w (R, kw)", "A_T (Cout, R)")

    def kernel_shape(self, shapes):
        self.expect_factor_count(shapes)
        shapes = [tuple(s) for s in shapes]
        for i, (s, name) in enumerate(zip(shapes, self.factor_names)):
            if len(s) != 2:
                raise self.error("factors[%d] (%s) must be 2-D, got shape %s" % (i, name, s))
            if min(s) <= 0:
                raise self.error("factors[%d] (%s) has an empty dimension: %s" % (i, name, s))
        (r, cin), (rh, kh), (rw, kw), (cout, rt) = shapes
        if not rh == rw == rt == r:
            raise self.error("rank mismatch: factors[0] (A_S) has R = %d but A_h is %s, A_w is %s and A_T is %s; "
                             "expected (%d, kh), (%d, kw) and (Cout, %d)" % (r, shapes[1], shapes[2], shapes[3],
                                                                             r, r, r))
        return KernelShape(cout, cin, kh, kw)

    def to_dense(self, factors):
        a_s, a_h, a_w, a_t = factors
        return torch.einsum("tr,rs,ri,rj->tsij", a_t, a_s, a_h, a_w)

    def chain(self, x, factors, stride, padding, dilation):
        a_s, a_h, a_w, a_t = factors
        r = a_s.shape[0]
        z = F.conv2d(x, a_s[:, :, None, None])
        z = F.conv2d(z, a_h[:, None, :, None], None, (stride[0], 1), (padding[0], 0), (dilation[0], 1), r)
        z = F.conv2d(z, a_w[:, None, None, :], None, (1, stride[1]), (0, padding[1]), (1, dilation[1]), r)
        return F.conv2d(z, a_t[:, :, None, None])

    def stage_macs(self, shapes, in_hw, out_hw):
        (r, cin), (_, kh), (_, kw), (cout, _) = shapes
        (h, w), (ho, wo) = in_hw, out_hw
        return [r * cin * h * w, r * kh * ho * w, r * kw * ho * wo, cout * r * ho * wo]
