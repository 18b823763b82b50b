"""Running an op on the native or the fallback path, for the parity and edge tests."""
from __future__ import annotations

import re
import warnings

from vitfast import _ext


def run_path(fn, native: bool):
    """('ok', result) or ('err', type, argument name) for fn() on the native or fallback path."""
    real = _ext.native
    if not native:
        _ext.native = lambda device: False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ("ok", fn())
    except (TypeError, ValueError) as exc:
        m = re.search(r"argument '(\w+)'", str(exc))
        assert m, f"an error that names no argument: {type(exc).__name__}: {exc}"
        return ("err", TypeError if isinstance(exc, TypeError) else ValueError, m.group(1), str(exc))
    finally:
        _ext.native = real
