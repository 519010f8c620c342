"""The batched CP-ALS that fits KCP's spatial factors: exact on low-rank tensors, each tensor's fit independent of
its batch, its reported error the true one, and on par with tensorly's parafac (the independent cross-check)."""
import warnings

import pytest
import torch

from hsvkernels.decompose import _cp_batched


def _low_rank(batch, dims, rank, gen):
    factors = [torch.randn(batch, d, rank, generator=gen, dtype=torch.float64) for d in dims]
    return _cp_batched.reconstruct(factors)


def _true_errors(x, factors):
    return (x - _cp_batched.reconstruct(factors)).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)


@pytest.mark.parametrize("dims,rank", [((5, 4, 3), 2), ((6, 6, 3, 3), 3), ((8, 4, 3, 3), 4), ((6, 6, 3, 3), 4)])
def test_recovers_low_rank_tensors(dims, rank):
    gen = torch.Generator().manual_seed(sum(dims) * rank)
    x = _low_rank(6, dims, rank, gen)
    factors, err, sweeps = _cp_batched.als(x, rank, iters=3000, tol=1e-15)
    assert [tuple(f.shape) for f in factors] == [(6, d, rank) for d in dims]
    assert err.max() < 1e-7 and _true_errors(x, factors).max() < 1e-7


@pytest.mark.parametrize("dims,rank", [((6, 5, 3), 4), ((8, 8, 3, 3), 8), ((4, 6, 3, 3), 40)])
def test_reported_error_is_the_true_error(dims, rank):
    x = torch.randn(5, *dims, dtype=torch.float64)
    factors, err, _ = _cp_batched.als(x, rank, iters=50)
    assert torch.allclose(err, _true_errors(x, factors), rtol=0, atol=1e-10)
    assert (err < 1).all()


def test_each_fit_is_independent_of_its_batch():
    # Tensors that converge at different sweeps stop there (the exact ones first), so a tensor fitted alone gets
    # the same factors.
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([_low_rank(2, (6, 5, 3, 3), 4, gen), torch.randn(3, 6, 5, 3, 3, generator=gen, dtype=torch.float64)])
    factors, err, _ = _cp_batched.als(x, 4, iters=300, tol=1e-4)
    for i in range(x.shape[0]):
        alone, err_alone, _ = _cp_batched.als(x[i:i + 1], 4, iters=300, tol=1e-4)
        assert abs(err[i] - err_alone[0]) < 1e-9
        rebuilt = _cp_batched.reconstruct([f[i:i + 1] for f in factors])
        assert (rebuilt - _cp_batched.reconstruct(alone)).abs().max() < 1e-7


def test_deterministic_and_float32():
    x = torch.randn(4, 8, 6, 3, 3)
    a, ea, _ = _cp_batched.als(x, 5, iters=20)
    b, eb, _ = _cp_batched.als(x, 5, iters=20)
    assert torch.equal(ea, eb) and all(torch.equal(p, q) for p, q in zip(a, b))
    assert a[0].dtype == torch.float32 and torch.allclose(ea, _true_errors(x, a), atol=1e-3)


def test_needs_a_batch_of_tensors():
    with pytest.raises(ValueError, match="at least 2 modes"):
        _cp_batched.als(torch.randn(4, 5), 2)


@pytest.mark.filterwarnings("ignore")  # tensorly's SVD init warns when the rank exceeds a mode's size
def test_on_par_with_tensorly_parafac():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac
    gen = torch.Generator().manual_seed(0)
    for dims, rank in [((8, 8, 3, 3), 8), ((16, 16, 3, 3), 16), ((6, 5, 3), 3)]:
        x = torch.randn(10, *dims, generator=gen, dtype=torch.float64)
        factors, _, _ = _cp_batched.als(x, rank, iters=200, tol=1e-10)
        ours = _true_errors(x, factors)
        theirs = []
        for t in x:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cp = parafac(t.numpy(), rank, n_iter_max=200, init="svd", tol=1e-10, random_state=0)
            theirs.append(float(tl.norm(tl.cp_to_tensor(cp) - t.numpy()) / tl.norm(t.numpy())))
        diff = ours - torch.tensor(theirs, dtype=torch.float64)
        # ALS finds local optima, so single tensors differ a little either way; on the whole it must not be worse
        assert diff.median() <= 2e-3 and diff.max() <= 0.05, (dims, rank, diff)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_inputs_device():
    x = torch.randn(3, 6, 5, 3, 3, dtype=torch.float64)
    on_cpu, err_cpu, sweeps_cpu = _cp_batched.als(x, 4, iters=40)
    on_gpu, err_gpu, sweeps_gpu = _cp_batched.als(x.cuda(), 4, iters=40)
    assert all(f.is_cuda for f in on_gpu) and err_gpu.is_cuda and sweeps_gpu == sweeps_cpu
    assert torch.allclose(err_gpu.cpu(), err_cpu, atol=1e-9)
    assert torch.allclose(_cp_batched.reconstruct(on_gpu).cpu(), _cp_batched.reconstruct(on_cpu), atol=1e-7)
