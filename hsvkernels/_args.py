"""Normalising the conv hyper-parameters users pass as ints or pairs."""


def pair(value, name):
    """(a, b) from an int or a 2-sequence of ints, with an error naming the argument."""
    if isinstance(value, bool):
        raise TypeError("%s must be an int or a pair of ints, got %r" % (name, value))
    if isinstance(value, int):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError("%s must be an int or a pair of ints, got %r" % (name, value)) from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError("%s must be an int or a pair of ints, got %r" % (name, value))
    return items


def conv_out_size(size, kernel, stride, padding, dilation):
    """Output length of one conv dimension (works on SymInts)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_target(name, value, what=None):
    """A compression target (ratio, macs_ratio) is None or a number >= 1; `what` says what it measures."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1):
        if what:
            raise ValueError("%s is %s (dense / factorized) and must be a number >= 1, got %r" % (name, what, value))
        raise ValueError("%s must be a number >= 1, got %r" % (name, value))


def check_seconds(name, value):
    """A timing budget in seconds: a finite number > 0 (NaN or inf would keep torch's autorange running forever)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError("%s must be a finite number of seconds > 0, got %r" % (name, value))


def check_count(name, value):
    """A repetition count: an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("%s must be an int >= 1, got %r" % (name, value))
