"""What a reload changes: the per-workflow diff and the daemon settings diff.

Pure functions, so the rules are unit-tested without a daemon:

- a workflow in the new configuration and not running is **started**;
- a running workflow whose fingerprint changed is **restarted** (drained,
  checkpointed, started again with the new config);
- a running workflow that is gone is **stopped** (its slot is kept unless its
  last good config says ``drop_slot_on_remove: true``) -- *unless* the file it
  came from is now invalid: then it is **kept** on its last good configuration
  until the file is fixed (the fixed file then applies like any change);
- everything else is **unchanged** and is not touched at all.

Daemon settings: ``log_level`` and ``log_format`` apply at once; ``state_dir``,
``socket`` and ``metrics_listen`` need a restart, so the running value stays and
the difference is reported.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dataflare.daemon.config import ConfigIssue, DaemonConfig, DaemonSettings, WorkflowConfig

RELOADABLE_SETTINGS = ("log_level", "log_format")
RESTART_SETTINGS = ("state_dir", "socket", "metrics_listen")


@dataclass(frozen=True)
class ReloadPlan:
    start: tuple[WorkflowConfig, ...] = ()
    restart: tuple[WorkflowConfig, ...] = ()  # the new configs of changed workflows
    stop: tuple[WorkflowConfig, ...] = ()  # the last good configs of removed workflows
    keep: tuple[str, ...] = ()  # running, file now invalid: last good config kept
    unchanged: tuple[WorkflowConfig, ...] = ()  # new configs (description, file may differ)

    def changes(self) -> list[str]:
        """`+added ~changed -removed !kept`, as `dataflare reload` prints them."""
        return (
            [f"+{w.name}" for w in self.start]
            + [f"~{w.name}" for w in self.restart]
            + [f"-{w.name}" for w in self.stop]
            + [f"!{n}" for n in self.keep]
        )


def plan_reload(
    running: Mapping[str, WorkflowConfig],
    wanted: Sequence[WorkflowConfig],
    issues: Sequence[ConfigIssue],
) -> ReloadPlan:
    """The diff between the running workflows (name -> config) and a new config."""
    bad_files = {os.path.abspath(i.file) for i in issues}
    new = {w.name: w for w in wanted}
    start: list[WorkflowConfig] = []
    restart: list[WorkflowConfig] = []
    stop: list[WorkflowConfig] = []
    keep: list[str] = []
    unchanged: list[WorkflowConfig] = []
    for name, cfg in running.items():
        if name not in new:
            if os.path.abspath(cfg.file) in bad_files:
                keep.append(name)
            else:
                stop.append(cfg)
        elif new[name].fingerprint() != cfg.fingerprint():
            restart.append(new[name])
        else:
            unchanged.append(new[name])
    for name, cfg in new.items():
        if name not in running:
            start.append(cfg)
    return ReloadPlan(tuple(start), tuple(restart), tuple(stop), tuple(keep), tuple(unchanged))


@dataclass(frozen=True)
class SettingChange:
    key: str
    running: Any
    configured: Any
    applied: bool

    def describe(self) -> str:
        if self.applied:
            return f"daemon.{self.key}: {self.running!r} -> {self.configured!r} (applied)"
        return (
            f"daemon.{self.key}: changed to {self.configured!r}; needs a restart "
            f"(still using {self.running!r})"
        )


def merge_settings(
    running: DaemonSettings, configured: DaemonSettings
) -> tuple[DaemonSettings, list[SettingChange]]:
    """The settings to run with after a reload and what differs from the file.

    Reloadable settings take the configured value; the others keep the running one."""
    changes: list[SettingChange] = []
    keep: dict[str, Any] = {}
    for f in dataclasses.fields(DaemonSettings):
        old, new = getattr(running, f.name), getattr(configured, f.name)
        if old == new:
            continue
        applied = f.name in RELOADABLE_SETTINGS
        changes.append(SettingChange(f.name, old, new, applied))
        if not applied:
            keep[f.name] = old
    return dataclasses.replace(configured, **keep), changes


def effective_config(
    running: DaemonConfig | None, configured: DaemonConfig
) -> tuple[DaemonConfig, list[SettingChange]]:
    """``configured`` with the settings that need a restart taken from ``running``."""
    if running is None:
        return configured, []
    settings, changes = merge_settings(running.daemon, configured.daemon)
    return dataclasses.replace(configured, daemon=settings), changes


def restart_issues(path: str, changes: Sequence[SettingChange]) -> list[ConfigIssue]:
    """Pending (not applied) setting changes as status entries with their line."""
    pending = [c for c in changes if not c.applied]
    if not pending:
        return []
    lines: dict[str, int] = {}
    try:
        from dataflare.daemon.yaml_located import load_located

        with open(path, encoding="utf-8") as f:
            doc, _ = load_located(f.read())
        if doc is not None:
            lines = {c.key: doc.line(("daemon", c.key)) for c in pending}
    except (OSError, UnicodeDecodeError):
        pass
    return [
        ConfigIssue(
            path,
            lines.get(c.key, 1),
            f"daemon.{c.key}",
            f"changed to {c.configured!r}: needs a restart (still using {c.running!r})",
        )
        for c in pending
    ]


def drop_slot_hook(workflow: WorkflowConfig) -> list[tuple[str, Any]]:
    """(source name, callable) for each source of ``workflow`` whose class has a
    ``drop_slot`` hook; the callable takes no arguments and may block (run it in a
    thread). The hook is called as ``drop_slot(name, config)``, or
    ``drop_slot(name, config, workflow=<workflow name>)`` when it accepts
    ``workflow`` (default slot names derive from the workflow name)."""
    from dataflare.cdc.registry import SOURCE_TYPES
    from dataflare.daemon.worker_spec import load_class

    hooks: list[tuple[str, Any]] = []
    for node in workflow.sources:
        kind = SOURCE_TYPES.get(node.type)
        if kind is None:
            continue
        cls = load_class(kind.implementation)
        hook = getattr(cls, "drop_slot", None)
        if hook is None or not callable(hook):
            continue
        try:
            params = inspect.signature(hook).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        accepts_workflow = "workflow" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )

        def call(
            hook: Any = hook,
            node_name: str = node.name,
            config: Any = node.config,
            with_workflow: bool = accepts_workflow,
        ) -> Any:
            if with_workflow:
                return hook(node_name, config, workflow=workflow.name)
            return hook(node_name, config)

        hooks.append((node.name, call))
    return hooks
