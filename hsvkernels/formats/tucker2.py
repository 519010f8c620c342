"""kind "tucker2": Tucker-2 on the two channel modes (Kim et al. 2016).

W = core x_T U_T x_S U_S, i.e. W[t,s,i,j] = sum U_T[t,c] core[c,d,i,j] U_S[d,s].
factors = [U_S (R_S, Cin), core (R_T, R_S, kh, kw), U_T (Cout, R_T)]: a 1x1 conv
Cin -> R_S (at the input resolution), the kh x kw core conv carrying all of
stride/padding/dilation, and a 1x1 conv R_T -> Cout.
"""
import torch
import torch.nn.functional as F

from .base import Format, KernelShape


class Tucker2(Format):
    kind = "tucker2"
    factor_names = ("U_S (R_S, Cin)", "core (R_T, R_S, kh, kw)", "U_T (Cout, R_T)")

    def kernel_shape(self, shapes):
        self.expect_factor_count(shapes)
        us, core, ut = (tuple(s) for s in shapes)
        if len(us) != 2:
            raise self.error("factors[0] (U_S) must be 2-D (R_S, Cin), got shape %s" % (us,))
        if len(core) != 4:
            raise self.error("factors[1] (core) must be 4-D (R_T, R_S, kh, kw), got shape %s" % (core,))
        if len(ut) != 2:
            raise self.error("factors[2] (U_T) must be 2-D (Cout, R_T), got shape %s" % (ut,))
        rs, cin = us
        rt, _, kh, kw = core
        if min(rs, rt, kh, kw, ut[0]) <= 0:
            raise self.error("a factor has an empty dimension: U_S %s, core %s, U_T %s" % (us, core, ut))
        if core[1] != rs:
            raise self.error("rank mismatch: factors[0] (U_S) has R_S = %d but factors[1] (core) has shape %s, "
                             "expected (R_T, %d, kh, kw)" % (rs, core, rs))
        if ut[1] != rt:
            raise self.error("rank mismatch: factors[1] (core) has R_T = %d but factors[2] (U_T) has shape %s, "
                             "expected (Cout, %d)" % (rt, ut, rt))
        return KernelShape(ut[0], cin, kh, kw)

    def to_dense(self, factors):
        us, core, ut = factors
        return torch.einsum("tc,cdij,ds->tsij", ut, core, us)

    def chain(self, x, factors, stride, padding, dilation):
        us, core, ut = factors
        z = F.conv2d(x, us[:, :, None, None])
        z = F.conv2d(z, core, None, stride, padding, dilation)
        return F.conv2d(z, ut[:, :, None, None])

    def stage_macs(self, shapes, in_hw, out_hw):
        (rs, cin), (rt, _, kh, kw), (cout, _) = shapes
        outside, inside = out_hw[0] * out_hw[1], in_hw[0] * in_hw[1]
        return [rs * cin * inside, rt * rs * kh * kw * outside, cout * rt * outside]
