"""The workflow DAG: which destinations each source's changes reach.

The config loader has already rejected unknown inputs and cycles; these helpers
assume a valid graph.
"""

from __future__ import annotations

from dataflare.daemon.config import WorkflowConfig


def consumers(wf: WorkflowConfig) -> dict[str, list[str]]:
    """node name -> names of the transformations and destinations that take it as input."""
    out: dict[str, list[str]] = {n.name: [] for n in (*wf.sources, *wf.transformations)}
    for node in (*wf.transformations, *wf.destinations):
        for i in node.inputs:
            out.setdefault(i, []).append(node.name)
    return out


def reachable(downstream: dict[str, list[str]], start: str) -> set[str]:
    """Every node downstream of ``start`` (``downstream`` as :func:`consumers` gives it)."""
    seen: set[str] = set()
    stack = [start]
    while stack:
        for nxt in downstream.get(stack.pop(), []):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def destinations_by_source(wf: WorkflowConfig) -> dict[str, list[str]]:
    """source name -> destination names its changes reach, in config order."""
    downstream = consumers(wf)
    dest_names = [d.name for d in wf.destinations]
    result: dict[str, list[str]] = {}
    for src in wf.sources:
        seen = reachable(downstream, src.name)
        result[src.name] = [d for d in dest_names if d in seen]
    return result


def paths(wf: WorkflowConfig) -> list[list[str]]:
    """Every source-to-destination path (for `dataflare plan`)."""
    downstream = consumers(wf)
    dests = {d.name for d in wf.destinations}
    out: list[list[str]] = []

    def walk(path: list[str]) -> None:
        node = path[-1]
        if node in dests:
            out.append(path)
            return
        for nxt in downstream.get(node, []):
            walk([*path, nxt])

    for s in wf.sources:
        walk([s.name])
    return out
