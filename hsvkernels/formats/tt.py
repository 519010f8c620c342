"""kind "tt": TT-conv with tensorized channels (Garipov et al. 2016, docs/methods.md §6).

Notation of methods.md §0: S = Cin (input channels), T = Cout (output channels).
The channels are tensorized as S = S_1*...*S_d and T = T_1*...*T_d, row-major
(s = s_1*(S_2*...*S_d) + ... + s_d, the same for t), and the kernel is a tensor
train over the d (output, input) mode pairs followed by one spatial core:

    W[t, s, i, j] = sum_{r_1..r_d} G_1[0, t_1, s_1, r_1] G_2[r_1, t_2, s_2, r_2] ...
                                   G_d[r_{d-1}, t_d, s_d, r_d] K[r_d, i, j]

factors = [G_1 (1, T_1, S_1, r_1), ..., G_d (r_{d-1}, T_d, S_d, r_d), K (r_d, kh, kw)]
(r_0 = 1; d = number of factors - 1). In each G_k, T_k is the output-channel mode
and S_k the input-channel mode.

Why the spatial core sits at the *end* of the train (Garipov puts it first, linked
to G_1 by r_0): then every stage is a conv on a plain view of the running
activation, with no permutes or copies at all.
    stage 0:   view (N*S, 1, H, W), kh x kw conv with K as (r_d, 1, kh, kw) carrying
               all of stride/padding/dilation; memory is now (n, s_1..s_d, r_d, p).
    stage k, for k = d, d-1, ..., 1: view
               (N*S_1*...*S_{k-1}, S_k*r_k, T_{k+1}*...*T_d*Ho, Wo),
               1x1 conv with G_k as (r_{k-1}*T_k, S_k*r_k, 1, 1).
               It contracts the adjacent (s_k, r_k) and writes (r_{k-1}, t_k) in their
               place; the finished output modes t_{k+1..d} ride in the spatial rows
               (the same trick as kind "hsv"), so memory goes to
               (n, s_<k, r_{k-1}, t_k, t_>k, p).
    output:    after k = 1 (r_0 = 1) memory is (n, t_1..t_d, p) = (N, Cout, Ho, Wo).
Where it costs no more MACs (merges_last_core), stage 0 and stage d run as one
kh x kw conv S_d -> r_{d-1}*T_d on the view (N*S_<d, S_d, H, W), with the weight
G_d @ K computed per call: a conv with one input channel runs far below a real
conv's speed, and the merged form never holds the r_d-times-the-input intermediate.
The C++ op runs the 1x1 contractions as batched matmuls over the view's batch (oneDNN's
1x1 conv was 10-25x slower on these few-channel, many-row views); this reference runs convs.
Every factor is its conv weight by a pure reshape. A d = 1 train,
[G_1 (1, Cout, Cin, r), K (r, kh, kw)], is a rank-r split of the (Cout*Cin) x (kh*kw)
matrix: a kh x kw conv 1 -> r on every input channel, then one 1x1 Cin*r -> Cout.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Format, KernelShape, as_shape


def merges_last_core(r_before, t_last, r_last, k2):
    """Whether G_d and K run as one conv: per input channel and position that costs
    r_{d-1}*T_d*k2 MACs, against r_d*k2 + r_d*r_{d-1}*T_d for the two stages."""
    return r_before * t_last * k2 <= r_last * k2 + r_last * r_before * t_last


LAYOUT = "[G_1 (1, T_1, S_1, r_1), ..., G_d (r_{d-1}, T_d, S_d, r_d), K (r_d, kh, kw)]"


@dataclass(frozen=True)
class Layout:
    """The sizes of one tt factor list: ranks = (r_0 = 1, r_1, ..., r_d)."""
    out_modes: tuple
    in_modes: tuple
    ranks: tuple
    kh: int
    kw: int

    @property
    def d(self):
        return len(self.in_modes)

    @property
    def merged(self):
        return merges_last_core(self.ranks[-2], self.out_modes[-1], self.ranks[-1], self.kh * self.kw)


class TT(Format):
    kind = "tt"
    factor_names = ("G_1 (1, T_1, S_1, r_1)", "...", "G_d (r_{d-1}, T_d, S_d, r_d)", "K (r_d, kh, kw)")

    def layout(self, shapes):
        """Checks the factor shapes and returns their Layout."""
        shapes = [tuple(s) for s in shapes]
        if len(shapes) < 2:
            raise self.error("expected d + 1 >= 2 factors %s, got %d" % (LAYOUT, len(shapes)))
        d = len(shapes) - 1
        for k, s in enumerate(shapes[:d]):
            if len(s) != 4:
                raise self.error("factors[%d] (G_%d) must be 4-D (r_%d, T_%d, S_%d, r_%d), got shape %s"
                                 % (k, k + 1, k, k + 1, k + 1, k + 1, s))
        if len(shapes[d]) != 3:
            raise self.error("factors[%d] (K, the last factor) must be 3-D (r_d, kh, kw), got shape %s"
                             % (d, shapes[d]))
        for k, s in enumerate(shapes):
            if min(s) <= 0:
                raise self.error("factors[%d] has an empty dimension: %s" % (k, s))
        if shapes[0][0] != 1:
            raise self.error("factors[0] (G_1) must have r_0 = 1 as its first dimension, got shape %s" % (shapes[0],))
        for k in range(1, d + 1):
            prev, cur = shapes[k - 1][3], shapes[k][0]
            if cur != prev:
                expected = "(%d, kh, kw)" % prev if k == d else "(%d, T_%d, S_%d, r_%d)" % (prev, k + 1, k + 1, k + 1)
                raise self.error("rank mismatch: factors[%d] (G_%d) has r_%d = %d but factors[%d] (%s) has shape %s, "
                                 "expected %s" % (k - 1, k, k, prev, k, "K" if k == d else "G_%d" % (k + 1),
                                                  shapes[k], expected))
        ranks = (1,) + tuple(s[3] for s in shapes[:d])
        return Layout(tuple(s[1] for s in shapes[:d]), tuple(s[2] for s in shapes[:d]), ranks,
                      shapes[d][1], shapes[d][2])

    def kernel_shape(self, shapes):
        lay = self.layout(shapes)
        return KernelShape(math.prod(lay.out_modes), math.prod(lay.in_modes), lay.kh, lay.kw)

    def to_dense(self, factors):
        lay = self.layout([f.shape for f in factors])
        # acc[r_k, t_>k, s_>k, (i, j)], built from the spatial end of the train.
        acc = factors[-1].reshape(lay.ranks[-1], 1, 1, lay.kh * lay.kw)
        for g in reversed(factors[:-1]):
            a, tk, sk, _ = g.shape
            acc = torch.einsum("atsb,bxyz->atxsyz", g, acc)
            acc = acc.reshape(a, tk * acc.shape[2], sk * acc.shape[4], acc.shape[5])
        return acc.reshape(acc.shape[1], acc.shape[2], lay.kh, lay.kw)

    def chain(self, x, factors, stride, padding, dilation):
        lay = self.layout([f.shape for f in factors])
        n, cin, h, w = x.shape
        d, k_core, r_last, s_last = lay.d, factors[-1], lay.ranks[-1], lay.in_modes[-1]
        if lay.merged:
            # G_d @ K as a broadcast product and sum, not a matmul: FlopCounterMode then counts
            # only the per-image convs, as the op's FLOP formula does (the product is per call).
            g = factors[d - 1].reshape(-1, r_last, 1)
            weight = (g * k_core.reshape(1, r_last, -1)).sum(1)
            weight = weight.reshape(lay.ranks[-2] * lay.out_modes[-1], s_last, lay.kh, lay.kw)
            z = F.conv2d(as_shape(x, n * cin // s_last, s_last, h, w), weight, None, stride, padding, dilation)
            contractions = range(d - 2, -1, -1)
        else:
            z = F.conv2d(x.reshape(n * cin, 1, h, w), k_core[:, None], None, stride, padding, dilation)
            contractions = range(d - 1, -1, -1)
        ho, wo = z.shape[2], z.shape[3]
        for k in contractions:  # 0-based: factors[k] is G_{k+1}
            s_before, t_after = math.prod(lay.in_modes[:k]), math.prod(lay.out_modes[k + 1:])
            r_in, r_out = lay.ranks[k + 1], lay.ranks[k]
            z = z.reshape(n * s_before, lay.in_modes[k] * r_in, t_after * ho, wo)
            z = F.conv2d(z, factors[k].reshape(r_out * lay.out_modes[k], lay.in_modes[k] * r_in, 1, 1))
        return as_shape(z, n, math.prod(lay.out_modes), ho, wo)

    def stage_macs(self, shapes, in_hw, out_hw):
        lay = self.layout(shapes)
        return [m * out_hw[0] * out_hw[1] for m in self.macs_per_position(lay)]

    @staticmethod
    def macs_per_position(lay):
        """MACs of each stage (execution order) per output position and image; all run at the output size.

        The per-call product G_d @ K of the merged form is not counted (it does not scale with the batch).
        """
        cin, k2, d = math.prod(lay.in_modes), lay.kh * lay.kw, lay.d
        if lay.merged:
            macs, contractions = [cin * lay.ranks[-2] * lay.out_modes[-1] * k2], range(d - 2, -1, -1)
        else:
            macs, contractions = [cin * lay.ranks[-1] * k2], range(d - 1, -1, -1)
        for k in contractions:
            s_upto, t_from = math.prod(lay.in_modes[:k + 1]), math.prod(lay.out_modes[k:])
            macs.append(s_upto * t_from * lay.ranks[k] * lay.ranks[k + 1])
        return macs

    def num_params(self, shapes):
        self.layout(shapes)
        return super().num_params(shapes)
