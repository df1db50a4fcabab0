"""Values of a COCO-format JSON as the conversion passes (:mod:`.convert_passes`) read them:
ids exactly (an int in range, or an integral float that float64 holds exactly), floats with a
'malformed' mask, and the bounds of the int32/int64 fields."""
from __future__ import annotations

from itertools import chain
from typing import Any, Optional

import numpy as np


INT32 = 2 ** 31
INT64 = 2 ** 63
FLOAT_EXACT = 2 ** 53  # float64 holds every integer below this exactly (2**53 may be a rounded 2**53 + 1)


def is_int(v: Any, lo: int, hi: int) -> bool:
    """``v`` is an int (or integral float) in [lo, hi], not a bool."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return (isinstance(v, int) or (np.isfinite(v) and v == int(v))) and lo <= v <= hi


def image_id_of(v: Any) -> Optional[int]:
    """An image entry's ``id`` -> int, or ``None`` when it is none: the rule of the annotations'
    ``image_id`` (:func:`exact_ints`), an int in int64 range or an integral float below 2**53
    (a JSON written through numpy/pandas floats holds ``1.0``)."""
    if type(v) is int and -INT64 <= v < INT64:
        return v
    if type(v) is float and v.is_integer() and abs(v) < FLOAT_EXACT:
        return int(v)
    return None


_NUMBER_TYPES = {int, float, type(None)}


def floats_of(values: list, width: int = 1, numbers_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """list -> float64 array ((n,) or (n, width)) and a 'malformed' mask; None -> NaN.
    ``numbers_only`` (``width`` > 1, a bbox): a row holding a boolean or a text is malformed
    (numpy reads ``true`` as 1.0 and ``"5"`` as 5.0)."""
    shape = (len(values), width) if width > 1 else (len(values),)
    try:
        arr = np.array(values, dtype=np.float64)
        if arr.shape == shape and not (numbers_only and width > 1 and
                                       not set(map(type, chain.from_iterable(values))) <= _NUMBER_TYPES):
            return arr, np.zeros(len(values), bool)
    except (TypeError, ValueError):
        pass
    out = np.full(shape, np.nan)
    bad = np.zeros(len(values), bool)
    for i, v in enumerate(values):
        try:
            if width > 1:
                if isinstance(v, (str, bytes)) or len(v) != width:
                    raise ValueError
                if numbers_only and not set(map(type, v)) <= _NUMBER_TYPES:
                    raise ValueError
                out[i] = [float(x) if x is not None else np.nan for x in v]
            else:
                out[i] = float(v) if v is not None else np.nan
        except (TypeError, ValueError):
            bad[i] = True
    return out, bad


def exact_ints(values: list) -> tuple[np.ndarray, np.ndarray]:
    """list -> exact int64 ids (image or category ids) and a 'malformed' mask (id -1 there).

    Python ints in the int64 range are taken as they are (float64 would merge ids 1 apart
    above 2**53); an integral float is accepted only where float64 holds it exactly (below
    2**53, where no other integer rounds to it). Anything else (fractional, boolean, text,
    None) is malformed. A fractional text with more digits than float64 keeps (such as
    ``7.0000000000000001``) arrives already rounded to an integer and cannot be told apart."""
    if all(type(v) is int for v in values):
        try:
            return np.array(values, dtype=np.int64), np.zeros(len(values), bool)
        except OverflowError:
            pass
    out = np.full(len(values), -1, np.int64)
    bad = np.ones(len(values), bool)
    for i, v in enumerate(values):
        if type(v) is int and -INT64 <= v < INT64:
            out[i], bad[i] = v, False
        elif type(v) is float and v.is_integer() and abs(v) < FLOAT_EXACT:
            out[i], bad[i] = int(v), False
    return out, bad
