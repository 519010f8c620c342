"""kind "tt_tucker": Tucker-2 on the channels plus a tensor train of the core (methods.md 5.4).

The core (R_T, R_S, kh, kw) as a TT in mode order (R_S, kh, kw, R_T) with TT rank a,
merged with the Tucker leaves, is the same four-conv layout as HT-2 with
R1 = R_S, R13 = a, R3 = R_T; only the decomposition and rank choice differ.
factors = [U1 (R_S, Cin), G1 (a, R_S, kh), G2 (R_T, a, kw), U3 (Cout, R_T)].
"""
from .ht2 import HT2


class TTTucker(HT2):
    kind = "tt_tucker"
