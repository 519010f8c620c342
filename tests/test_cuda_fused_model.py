"""The index arithmetic of csrc/ops/cuda/two_stage_fused.cu, transcribed to Python and
checked against F.conv2d on CPU.

The fused CUDA kernel cannot run without a GPU, but most ways for it to be wrong are in
its indexing: the K order of the packed V against the on-the-fly im2col gather, tap and
pixel decomposition, padding and past-the-end predicates, the hsv U = A kron I_T2
mapping, and the strided output writes. This model follows the kernel's tiles and
formulas one for one (names as in the .cu file), with exact float64 arithmetic in place
of the tensor-core products, so an index bug in the scheme shows up here on any machine.
It checks the transcription, not the compiled kernel: keep the two in step when editing
either (tests/test_cuda_fused.py checks the kernel itself on a GPU).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hsvkernels

# the kernel's tile constants
kThreads, kTileM, kTileK, kTileN, kMaxRank = 128, 64, 32, 64, 128
kGatherPerThread = kTileK * kTileM // kThreads


def round_up(v, m):
    return (v + m - 1) // m * m


def two_stage_factors(kind, factors):
    """V (r, Cin, kh, kw), U (Cout, r) as two_stage_factors() builds them."""
    if kind == "svd":
        return factors
    b, a = factors
    P, T2, T1 = b.shape[0], b.shape[1], a.shape[0]
    v = b.reshape(P * T2, b.shape[2], b.shape[3], b.shape[4])
    u = torch.kron(a.reshape(T1, P), torch.eye(T2, dtype=a.dtype))
    return v, u


def gather_coords(e, channels_fastest):
    if channels_fastest:
        return e % kTileK, e // kTileK
    return e // kTileM, e % kTileM


def gather_tile(element, k0, channels_fastest):
    """The kTileK x kTileM tile of G[k][m] = element(k, m) as the threads gather it
    (every element written exactly once: NaN-initialized, checked)."""
    b_s = np.full((kTileK, kTileM), np.nan)
    e = np.arange(kThreads)[:, None] + np.arange(kGatherPerThread)[None, :] * kThreads   # [tid, i]
    kk, m = gather_coords(e, channels_fastest)
    b_s[kk, m] = element(k0 + kk, m)
    assert not np.isnan(b_s).any()
    return b_s


def rank_gemm(a_pad, element, channels_fastest, steps=None):
    """acc = A @ G over K in steps of kTileK (a_pad: rows_pad x k_steps * kTileK), or over `steps` only."""
    acc = np.zeros((a_pad.shape[0], kTileM))
    for k0 in (range(0, a_pad.shape[1], kTileK) if steps is None else [s * kTileK for s in steps]):
        acc += a_pad[:, k0:k0 + kTileK] @ gather_tile(element, k0, channels_fastest)
    return acc


def output_stage(out_flat, up, t_s, cout, pix_out, oc, bias, partial=None):
    """Stage 2 and the epilogue: out = bias + Up @ T through the output strides
    (split-K: partial += Up @ T_split, no bias)."""
    for co0 in range(0, cout, kTileN):
        o_s = up[co0:co0 + kTileN] @ t_s
        for e in range(kTileN * kTileM):
            j, m = (e % kTileN, e // kTileN) if oc == 1 else (e // kTileM, e % kTileM)
            co = co0 + j
            if co < cout and pix_out[m] >= 0:
                if partial is not None:
                    partial[pix_out[m] + co * oc] += o_s[j, m]
                else:
                    out_flat[pix_out[m] + co * oc] = o_s[j, m] + (0.0 if bias is None else float(bias[co]))


def storage_of(x):
    """The input's storage as a flat array, its strides and storage offset (the kernel's view of it)."""
    return x.as_strided((x.untyped_storage().nbytes() // 8,), (1,), 0).numpy(), x.stride(), x.storage_offset()


def output_like(x, n, cout, ho, wo):
    """output_memory_format(): channels_last when the input is (and is not also contiguous)."""
    out = torch.empty(n, cout, ho, wo, dtype=torch.float64)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out, np.full(out.numel(), np.nan)


def finish(out, out_flat):
    assert not np.isnan(out_flat).any(), "an output element was never written"
    return torch.as_strided(torch.from_numpy(out_flat), out.shape, out.stride())


def out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def model_forward(x, kind, factors, bias, stride, padding, dilation, splits=1):
    """two_stage_kernel (svd, hsv level 1), with `splits` parts of K as two_stage_forward clamps them."""
    v, u = two_stage_factors(kind, factors)
    r, cin, kh, kw = v.shape
    cout = u.shape[0]
    n, _, h, w = x.shape
    ho, wo = out_size(h, kh, stride[0], padding[0], dilation[0]), out_size(w, kw, stride[1], padding[1], dilation[1])
    # host side: Vp (rp, k_pad) with K ordered (tap, channel), Up (cout_pad, rp), zero padded
    k, rp, cout_pad = kh * kw * cin, round_up(r, 16), round_up(cout, kTileN)
    k_pad = round_up(k, kTileK)
    vp = np.zeros((rp, k_pad))
    vp[:r, :k] = v.permute(0, 2, 3, 1).reshape(r, k).numpy()
    up = np.zeros((cout_pad, rp))
    up[:cout, :r] = u.numpy()
    x_flat, (sn, sc, sh, sw), x_off0 = storage_of(x)
    out, out_flat = output_like(x, n, cout, ho, wo)
    on, oc, oh, ow = out.stride()
    tiles_per_image = (ho * wo + kTileM - 1) // kTileM
    k_steps = k_pad // kTileK
    splits = max(1, min(splits, k_steps, 65535))
    steps_per_split = (k_steps + splits - 1) // splits
    splits = (k_steps + steps_per_split - 1) // steps_per_split
    partial = np.zeros(out.numel()) if splits > 1 else None
    for block, split in ((b, s) for b in range(n * tiles_per_image) for s in range(splits)):
        bn = block // tiles_per_image
        m0 = (block - bn * tiles_per_image) * kTileM
        step_begin = split * steps_per_split
        steps = range(step_begin, min(k_steps, step_begin + steps_per_split))
        # pixel tables
        q = m0 + np.arange(kTileM)
        valid = q < ho * wo
        oy, ox = q // wo, q % wo
        pix_out = np.where(valid, bn * on + oy * oh + ox * ow, -1)
        pix_iy = np.where(valid, oy * stride[0] - padding[0], 0)
        pix_ix = np.where(valid, ox * stride[1] - padding[1], 0)

        def im2col_element(kg, m):
            tap, c = kg // cin, kg % cin
            ty, tx = tap // kw, tap % kw
            iy, ix = pix_iy[m] + ty * dilation[0], pix_ix[m] + tx * dilation[1]
            inside = (kg < k) & (pix_out[m] >= 0) & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
            addr = x_off0 + bn * sn + c * sc + iy * sh + ix * sw
            return np.where(inside, x_flat[np.where(inside, addr, 0)], 0.0)

        t_s = rank_gemm(vp, im2col_element, sc == 1, steps)
        output_stage(out_flat, up, t_s, cout, pix_out, oc, bias, partial)
    if partial is not None:   # the host: out = partial + bias, in out's layout
        y = torch.as_strided(torch.from_numpy(partial), out.shape, out.stride())
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        out.copy_(y)
        out_flat = out.as_strided((out.numel(),), (1,), 0).numpy().copy()
    return finish(out, out_flat)


kTileH = kTileW = 8


def model_tucker2(x, factors, bias, stride, padding, dilation):
    """tucker2_kernel: stage 0 over the halo into Z, stage 1 gathered from Z, stage 2."""
    us, core, ut = factors
    rs, cin = us.shape
    rt, _, kh, kw = core.shape
    cout = ut.shape[0]
    n, _, h, w = x.shape
    ho, wo = out_size(h, kh, stride[0], padding[0], dilation[0]), out_size(w, kw, stride[1], padding[1], dilation[1])
    rsp, rtp, cin_pad = round_up(rs, 16), round_up(rt, 16), round_up(cin, kTileK)
    k1 = kh * kw * rs
    k1_pad, cout_pad = round_up(k1, kTileK), round_up(cout, kTileN)
    usp = np.zeros((rsp, cin_pad))
    usp[:rs, :cin] = us.numpy()
    cp = np.zeros((rtp, k1_pad))
    cp[:rt, :k1] = core.permute(0, 2, 3, 1).reshape(rt, k1).numpy()
    utp = np.zeros((cout_pad, rtp))
    utp[:cout, :rt] = ut.numpy()
    halo_h = (kTileH - 1) * stride[0] + (kh - 1) * dilation[0] + 1
    halo_w = (kTileW - 1) * stride[1] + (kw - 1) * dilation[1] + 1
    halo_px = halo_h * halo_w
    halo_cols = round_up(halo_px, kTileM)
    x_flat, (sn, sc, sh, sw), x_off0 = storage_of(x)
    out, out_flat = output_like(x, n, cout, ho, wo)
    on, oc, oh, ow = out.stride()
    tiles_w, tiles_h = (wo + kTileW - 1) // kTileW, (ho + kTileH - 1) // kTileH
    tiles_per_image = tiles_w * tiles_h
    for block in range(n * tiles_per_image):
        bn = block // tiles_per_image
        tile = block - bn * tiles_per_image
        oy0, ox0 = (tile // tiles_w) * kTileH, (tile - (tile // tiles_w) * tiles_w) * kTileW
        iy_origin, ix_origin = oy0 * stride[0] - padding[0], ox0 * stride[1] - padding[1]
        m = np.arange(kTileM)
        my, mx = m // kTileW, m % kTileW
        oy, ox = oy0 + my, ox0 + mx
        pix_out = np.where((oy < ho) & (ox < wo), bn * on + oy * oh + ox * ow, -1)
        pix_hy, pix_hx = my * stride[0], mx * stride[1]
        z_s = np.full((rsp, halo_cols), np.nan)
        for hc0 in range(0, halo_cols, kTileM):
            def halo_element(c, m):
                hp = hc0 + m
                hy, hx = hp // halo_w, hp % halo_w
                iy, ix = iy_origin + hy, ix_origin + hx
                inside = (c < cin) & (hp < halo_px) & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
                addr = x_off0 + bn * sn + c * sc + iy * sh + ix * sw
                return np.where(inside, x_flat[np.where(inside, addr, 0)], 0.0)

            z_s[:, hc0:hc0 + kTileM] = rank_gemm(usp, halo_element, sc == 1)

        def z_element(k, m):
            tap, r = k // rs, k % rs
            ty, tx = tap // kw, tap % kw
            hy, hx = pix_hy[m] + ty * dilation[0], pix_hx[m] + tx * dilation[1]
            valid = (k < k1) & (pix_out[m] >= 0)
            assert ((hy < halo_h) & (hx < halo_w) | ~valid).all(), "a tap outside the halo"
            return np.where(valid, z_s[np.where(valid, r, 0), np.where(valid, hy * halo_w + hx, 0)], 0.0)

        t_s = rank_gemm(cp, z_element, False)
        output_stage(out_flat, utp, t_s, cout, pix_out, oc, bias)
    return finish(out, out_flat)


def layouts(x):
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    wide = torch.zeros(n, c, h, 2 * w, dtype=x.dtype)
    wide[..., ::2] = x
    yield "noncontiguous", wide[..., ::2]
    offset = torch.zeros(x.numel() + 7, dtype=x.dtype)
    offset[7:] = x.flatten()
    yield "storage_offset", offset[7:].view(x.shape)


SPECS = [
    # (N, Cin, Cout, r, H, W, kh, kw, stride, padding, dilation)
    (2, 8, 16, 5, 9, 11, 3, 3, (1, 1), (1, 1), (1, 1)),
    (1, 40, 70, 35, 13, 11, 3, 3, (2, 2), (1, 1), (1, 1)),       # K 360, two Cout chunks
    (1, 3, 20, 16, 23, 21, 7, 7, (2, 2), (3, 3), (1, 1)),        # stem-like, several pixel tiles
    (3, 6, 10, 4, 6, 5, 2, 3, (2, 1), (0, 1), (1, 2)),           # even kernel, mixed stride/dilation
    (2, 16, 8, 8, 9, 9, 1, 1, (2, 2), (0, 0), (1, 1)),           # 1x1 stride 2
    (1, 4, 6, 3, 12, 13, 3, 3, (1, 1), (2, 2), (2, 2)),          # dilation 2
]


@pytest.mark.parametrize("splits", [1, 3], ids=["whole_k", "split_k3"])
@pytest.mark.parametrize("spec", SPECS, ids=[str(i) for i in range(len(SPECS))])
def test_model_svd_matches_conv(spec, splits):
    torch.manual_seed(0)
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = spec
    v = torch.randn(r, cin, kh, kw, dtype=torch.float64)
    u = torch.randn(cout, r, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    dense = (u @ v.reshape(r, -1)).reshape(cout, cin, kh, kw)
    truth = F.conv2d(x, dense, bias, stride, padding, dilation)
    for name, xl in layouts(x):
        y = model_forward(xl, "svd", [v, u], bias, stride, padding, dilation, splits)
        torch.testing.assert_close(y, truth, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("T2", [1, 2, 3, 4])
def test_model_hsv_level1_matches_dense(T2):
    torch.manual_seed(T2)
    P, T1, S2, kh, kw = 5, 7, 9, 3, 2
    b = torch.randn(P, T2, S2, kh, kw, dtype=torch.float64)
    a = torch.randn(T1, 1, P, dtype=torch.float64)
    fact = hsvkernels.Factorization("hsv", [b, a], (T1 * T2, S2, kh, kw))
    x = torch.randn(2, S2, 10, 9, dtype=torch.float64)
    truth = F.conv2d(x, fact.to_dense(), None, (1, 2), (1, 0), 1)
    for name, xl in layouts(x):
        y = model_forward(xl, "hsv", [b, a], None, (1, 2), (1, 0), (1, 1))
        torch.testing.assert_close(y, truth, rtol=1e-10, atol=1e-10, msg=name)


TUCKER_SPECS = [
    # (N, Cin, Cout, R_S, R_T, H, W, kh, kw, stride, padding, dilation)
    (2, 8, 16, 5, 6, 9, 11, 3, 3, (1, 1), (1, 1), (1, 1)),
    (1, 40, 70, 35, 20, 19, 17, 3, 3, (2, 2), (1, 1), (1, 1)),    # stride 2, two Cout chunks, several tiles
    (3, 6, 10, 4, 3, 6, 5, 2, 3, (2, 1), (0, 1), (1, 2)),         # even kernel, mixed stride/dilation
    (1, 4, 6, 3, 5, 12, 13, 3, 3, (1, 1), (2, 2), (2, 2)),        # dilation 2
    (2, 16, 8, 8, 16, 9, 9, 1, 1, (1, 1), (0, 0), (1, 1)),        # 1x1 core
]


@pytest.mark.parametrize("spec", TUCKER_SPECS, ids=[str(i) for i in range(len(TUCKER_SPECS))])
def test_model_tucker2_matches_conv(spec):
    torch.manual_seed(1)
    n, cin, cout, rs, rt, h, w, kh, kw, stride, padding, dilation = spec
    us = torch.randn(rs, cin, dtype=torch.float64)
    core = torch.randn(rt, rs, kh, kw, dtype=torch.float64)
    ut = torch.randn(cout, rt, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    fact = hsvkernels.Factorization("tucker2", [us, core, ut], (cout, cin, kh, kw))
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    truth = F.conv2d(x, fact.to_dense(), bias, stride, padding, dilation)
    for name, xl in layouts(x):
        y = model_tucker2(xl, [us, core, ut], bias, stride, padding, dilation)
        torch.testing.assert_close(y, truth, rtol=1e-10, atol=1e-10, msg=name)
