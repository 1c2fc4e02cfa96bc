"""Construction helper shared by the frozen price dataclasses.

The dataclasses declare ``init=False`` and write their own ``__init__``: callers pass
``"USD"`` and ``"0.05"`` (typed as such), the stored fields are ``Currency`` and
``Decimal``, and every field is validated before one ``PriceError`` is raised.
"""

from __future__ import annotations

from typing import Any


def assign(obj: Any, **values: Any) -> None:
    """Set the validated fields of a frozen dataclass from its __init__."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)
