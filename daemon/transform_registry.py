"""Transformation types by name (see dataflare.cdc.registry for the pattern)."""

from __future__ import annotations

from dataflare.cdc.registry import ConnectorType
from dataflare.daemon.transforms.configs import (
    FilterConfig,
    LookupConfig,
    MappingConfig,
    MaskConfig,
    RenameConfig,
    RouteConfig,
)

_T = "dataflare.daemon.transforms."

TRANSFORM_TYPES: dict[str, ConnectorType] = {
    "filter": ConnectorType(FilterConfig, _T + "filter:FilterTransform"),
    "lookup": ConnectorType(LookupConfig, _T + "lookup:LookupTransform"),
    "mapping": ConnectorType(MappingConfig, _T + "mapping:MappingTransform"),
    "mask": ConnectorType(MaskConfig, _T + "mask:MaskTransform"),
    "rename": ConnectorType(RenameConfig, _T + "rename:RenameTransform"),
    "route": ConnectorType(RouteConfig, _T + "route:RouteTransform"),
}
