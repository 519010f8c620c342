"""Bad inputs raise ValueError/TypeError/RuntimeError whose message names the problem.

Each case runs through the C++ op (torch.ops.hsv.conv2d), the fake kernel (meta
tensors) and the reference path, which must all refuse it the same way.
"""
import pytest
import torch

from hsvkernels import reference


def _good():
    v = torch.randn(4, 8, 3, 3)
    u = torch.randn(16, 4)
    x = torch.randn(2, 8, 10, 10)
    return x, [v, u], torch.randn(16)


def _call_op(x, factors, bias, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, kind="svd"):
    return torch.ops.hsv.conv2d(x, factors, bias, list(stride), list(padding), list(dilation), groups, kind)


def _call_meta(x, factors, bias, *args, **kwargs):
    to_meta = lambda t: None if t is None else t.to("meta")  # noqa: E731
    return _call_op(to_meta(x), [to_meta(f) for f in factors], to_meta(bias), *args, **kwargs)


def _call_reference(x, factors, bias, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, kind="svd"):
    return reference.conv2d_factors(x, factors, bias, stride, padding, dilation, groups, kind)


CALLERS = {"op": _call_op, "meta": _call_meta, "reference": _call_reference}


def _cases():
    x, (v, u), b = _good()
    return {
        "input_3d": ((x[0], [v, u], b), {}, "input must be 4-D"),
        "input_int": ((x.to(torch.int64), [v, u], None), {}, "floating point"),
        "cin_mismatch": ((torch.randn(2, 6, 10, 10), [v, u], b), {}, "channels"),
        "rank_mismatch": ((x, [v, torch.randn(16, 5)], b), {}, "rank mismatch"),
        "v_not_4d": ((x, [v.reshape(4, 72), u], b), {}, "factors[0] (V) must be 4-D"),
        "u_not_2d": ((x, [v, u[None]], b), {}, "factors[1] (U) must be 2-D"),
        "dtype_mismatch": ((x, [v.double(), u], b), {}, "factors[0] has dtype"),
        "bias_dtype": ((x, [v, u], b.double()), {}, "bias has dtype"),
        "bias_shape": ((x, [v, u], torch.randn(15)), {}, "bias must have shape (16,)"),
        "unknown_kind": ((x, [v, u], b), {"kind": "nope"}, "unknown kind 'nope'"),
        "empty_factors": ((x, [], b), {}, "factors is empty"),
        "wrong_factor_count": ((x, [v], b), {}, "expected 2 factors"),
        "groups_not_dividing": ((x, [v, u], b), {"groups": 3}, "not divisible by groups"),
        "groups_unsupported": ((x, [v, u], b), {"groups": 2}, "groups=1 only"),
        "zero_stride": ((x, [v, u], b), {"stride": (0, 1)}, "stride must be positive"),
        "negative_padding": ((x, [v, u], b), {"padding": (-1, 0)}, "padding must be non-negative"),
        "zero_dilation": ((x, [v, u], b), {"dilation": (1, 0)}, "dilation must be positive"),
        "input_too_small": ((torch.randn(2, 8, 2, 10), [v, u], b), {"padding": (0, 0)}, "smaller than the dilated kernel"),
        # padded, the fused kernel returned the bias for an empty image; F.conv2d and the reference refused it
        "empty_width": ((torch.randn(1, 8, 5, 0), [v, u], b), {"padding": (3, 3)}, "input width is 0"),
    }


CASES = _cases()


@pytest.mark.parametrize("caller", sorted(CALLERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_clearly(caller, case):
    args, kwargs, message = CASES[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=_escape(message)):
        CALLERS[caller](*args, **kwargs)


def _escape(message):
    import re

    return re.escape(message)


def test_device_mismatch_is_refused():
    x, (v, u), b = _good()
    with pytest.raises((ValueError, RuntimeError), match="is on meta but input is on cpu"):
        _call_op(x, [v.to("meta"), u], b)


def test_wrapper_rejects_non_factorization():
    import hsvkernels

    x, (v, u), b = _good()
    with pytest.raises(TypeError, match="Factorization"):
        hsvkernels.conv2d(x, [v, u], b)
    fact = hsvkernels.Factorization("svd", [v, u], (16, 8, 3, 3))
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        hsvkernels.conv2d(x, fact, b, stride=(1, 2, 3))
