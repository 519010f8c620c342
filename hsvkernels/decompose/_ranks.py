"""Checking explicit rank tuples for the multi-rank classical methods."""


def check_ranks(rank, names, bounds, method, shape):
    """rank: an int (the same for every slot) or a tuple with one int per name.

    Returns the tuple, or raises a TypeError/ValueError naming the slot and its bound.
    """
    if isinstance(rank, int) and not isinstance(rank, bool):
        rank = (rank,) * len(names)
    if not isinstance(rank, (tuple, list)) or len(rank) != len(names):
        raise TypeError("%s rank must be an int, a tuple (%s), 'evbmf' or one of the method's rank rules, got %r"
                        % (method, ", ".join(names), rank))
    out = []
    for name, r, bound in zip(names, rank, bounds):
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError("%s rank %s must be an int, got %r" % (method, name, r))
        if not 1 <= r <= bound:
            raise ValueError("%s rank %s must be in [1, %d] for shape %s, got %d" % (method, name, bound, shape, r))
        out.append(r)
    return tuple(out)
