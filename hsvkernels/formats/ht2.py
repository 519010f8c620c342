"""kind "ht2": Hierarchical Tucker-2 (Gabor & Zdunek 2023), as the official code runs it.

With the kernel permuted to (Cin, kh, Cout, kw), the HT tree with root split
{Cin, kh} | {Cout, kw} gives W[t,s,i,j] = sum U3[t,c] G2[c,b,j] G1[b,a,i] U1[a,s]
(a tensor train in mode order Cin, kh, kw, Cout with ranks R1, R13, R3).
factors = [U1 (R1, Cin), G1 (R13, R1, kh), G2 (R3, R13, kw), U3 (Cout, R3)], stored
so that each is a conv weight by a pure reshape: 1x1 Cin -> R1 (input resolution),
kh x 1 R1 -> R13 with the height stride/padding/dilation, 1 x kw R13 -> R3 with
the width ones, and 1x1 R3 -> Cout.
"""
import torch
import torch.nn.functional as F

from .base import Format, KernelShape


class HT2(Format):
    kind = "ht2"
    factor_names = ("U1 (R1, Cin)", "G1 (R13, R1, kh)", "G2 (R3, R13, kw)", "U3 (Cout, R3)")

    def kernel_shape(self, shapes):
        self.expect_factor_count(shapes)
        u1, g1, g2, u3 = (tuple(s) for s in shapes)
        for i, (s, dims, name) in enumerate(zip((u1, g1, g2, u3), (2, 3, 3, 2), self.factor_names)):
            if len(s) != dims:
                raise self.error("factors[%d] (%s) must be %d-D, got shape %s" % (i, name, dims, s))
        r1, cin = u1
        r13, _, kh = g1
        r3, _, kw = g2
        if min(r1, r13, r3, kh, kw, u3[0]) <= 0:
            raise self.error("a factor has an empty dimension: U1 %s, G1 %s, G2 %s, U3 %s" % (u1, g1, g2, u3))
        if g1[1] != r1:
            raise self.error("rank mismatch: factors[0] (U1) has R1 = %d but factors[1] (G1) has shape %s, "
                             "expected (R13, %d, kh)" % (r1, g1, r1))
        if g2[1] != r13:
            raise self.error("rank mismatch: factors[1] (G1) has R13 = %d but factors[2] (G2) has shape %s, "
                             "expected (R3, %d, kw)" % (r13, g2, r13))
        if u3[1] != r3:
            raise self.error("rank mismatch: factors[2] (G2) has R3 = %d but factors[3] (U3) has shape %s, "
                             "expected (Cout, %d)" % (r3, u3, r3))
        return KernelShape(u3[0], cin, kh, kw)

    def to_dense(self, factors):
        u1, g1, g2, u3 = factors
        return torch.einsum("tc,cbj,bai,as->tsij", u3, g2, g1, u1)

    def chain(self, x, factors, stride, padding, dilation):
        u1, g1, g2, u3 = factors
        z = F.conv2d(x, u1[:, :, None, None])
        z = F.conv2d(z, g1[:, :, :, None], None, (stride[0], 1), (padding[0], 0), (dilation[0], 1))
        z = F.conv2d(z, g2[:, :, None, :], None, (1, stride[1]), (0, padding[1]), (1, dilation[1]))
        return F.conv2d(z, u3[:, :, None, None])

    def stage_macs(self, shapes, in_hw, out_hw):
        (r1, cin), (r13, _, kh), (r3, _, kw), (cout, _) = shapes
        (h, w), (ho, wo) = in_hw, out_hw
        return [r1 * cin * h * w, r13 * r1 * kh * ho * w, r3 * r13 * kw * ho * wo, cout * r3 * ho * wo]
