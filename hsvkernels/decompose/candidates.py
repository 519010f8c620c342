"""The interface between decomposition methods and rank selection.

A method module may define `candidates(weight, out_hw) -> list[Candidate]`: the
configurations it could produce for this weight (splits, ranks), each with its
exact cost and the relative energy it loses, computed cheaply (singular values,
not full decompositions). hsvkernels.ranks picks one per layer under a global
budget and then calls decompose(weight, method, **candidate.config).
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    config: dict = field(hash=False)   # keyword arguments for decompose(weight, method, **config)
    params: int                        # parameters of the factorized layer
    macs: int                          # multiply-accumulates per image at out_hw
    rel_err_sq: float                  # ||W - W_hat||_F^2 / ||W||_F^2 (estimated where exact is too costly)
