"""Running many small linear-algebra calls on one intra-op thread."""
import contextlib
import functools

import torch


@contextlib.contextmanager
def single_thread():
    """torch on one thread inside the block.

    Rank selection and the KCP fits do thousands of tiny SVDs, solves and
    einsums; with several threads each call pays a thread-pool barrier, which on
    a busy machine costs far more than the work (seen: 70 s vs 1 s).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded(fn):
    """Decorator form of single_thread()."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_thread():
            return fn(*args, **kwargs)
    return wrapper
