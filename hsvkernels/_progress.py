"""One tqdm progress bar helper for the long loops (conversion, fine-tuning)."""


def progress(items, enabled, desc, unit):
    """`items` wrapped in a tqdm bar when enabled; disable=None hides it when stderr is not a terminal (CI, pipes)."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, disable=None, leave=False)
