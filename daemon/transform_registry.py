"""Transformation types by name (see dataflare.cdc.registry for the pattern).

Empty until the transforms land; the config loader treats this registry exactly
like SOURCE_TYPES and SINK_TYPES, so adding an entry is all a transform needs.
"""

from __future__ import annotations

from dataflare.cdc.registry import ConnectorType

TRANSFORM_TYPES: dict[str, ConnectorType] = {}
