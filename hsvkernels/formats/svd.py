"""kind "svd": truncated SVD of the im2col weight, W.reshape(Cout, Cin*kh*kw) ~= U @ V.

factors = [V (r, Cin, kh, kw), U (Cout, r)]. V is stored as a conv weight so that
stage 0 is one kh x kw conv Cin -> r (all of stride/padding/dilation live there)
and stage 1 a 1x1 conv r -> Cout; both are pure views of the factors.
"""
import torch.nn.functional as F

from .base import Format, KernelShape


class SVD(Format):
    kind = "svd"
    factor_names = ("V (r, Cin, kh, kw)", "U (Cout, r)")

    def kernel_shape(self, shapes):
        self.expect_factor_count(shapes)
        v, u = shapes
        if len(v) != 4:
            raise self.error("factors[0] (V) must be 4-D (r, Cin, kh, kw), got shape %s" % (tuple(v),))
        if len(u) != 2:
            raise self.error("factors[1] (U) must be 2-D (Cout, r), got shape %s" % (tuple(u),))
        r, cin, kh, kw = v
        if min(r, kh, kw) <= 0:
            raise self.error("factors[0] (V) has an empty dimension: %s" % (tuple(v),))
        if u[1] != r:
            raise self.error("rank mismatch: factors[0] (V) has r = %d but factors[1] (U) has shape %s, "
                             "expected (Cout, %d)" % (r, tuple(u), r))
        if u[0] <= 0:
            raise self.error("factors[1] (U) has Cout = 0")
        return KernelShape(u[0], cin, kh, kw)

    def to_dense(self, factors):
        v, u = factors
        return (u @ v.reshape(v.shape[0], -1)).reshape(u.shape[0], *v.shape[1:])

    def chain(self, x, factors, stride, padding, dilation):
        v, u = factors
        z = F.conv2d(x, v, None, stride, padding, dilation)
        return F.conv2d(z, u[:, :, None, None])

    def stage_macs(self, shapes, in_hw, out_hw):
        (r, cin, kh, kw), (cout, _) = shapes
        positions = out_hw[0] * out_hw[1]
        return [r * cin * kh * kw * positions, cout * r * positions]
