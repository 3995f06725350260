"""Constrained field types shared by the contract and every settings section.

Each is an `Annotated` alias that msgspec checks while decoding, so a value out of range is
refused where it enters (a request, a config file, an environment variable), with the field
named in the error.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
"""A TCP port; 0 asks the system for a free one."""
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
AbsolutePath = Annotated[str, msgspec.Meta(pattern=r"^/")]
Priority = Literal["interactive", "batch"]
"""Which queue a build waits in: interactive builds go ahead of batch ones."""
