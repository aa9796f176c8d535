"""What several resources' shapes share: the printable-text rule and the state names they spell alike."""

from __future__ import annotations

from typing import Literal

AdminStateName = Literal["enabled", "draining", "maintenance"]
PlacementName = Literal["breadth", "depth"]

# No control characters in any text we store or look up (PostgreSQL refuses NUL, logs hate the rest).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
