"""What the model commands share."""
from __future__ import annotations


def cli_errors(main_fn):
    """Report bad input (ValueError, FileNotFoundError) as one clear line and exit status 2."""
    import functools
    import sys

    @functools.wraps(main_fn)
    def wrapper(argv=None):
        try:
            return main_fn(argv)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper
