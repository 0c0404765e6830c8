"""Watch the configuration directory and ask for a reload when a config file changes.

watchfiles (inotify) watches, without recursion, the directory of the daemon file
and the workflows directory. Only changes to the daemon file itself and to
``*.yaml``/``*.yml`` files directly in the workflows directory count; editors'
temporary, swap and backup files (``.x.yaml.swp``, ``4913``, ``x.yaml~``) and
anything else living beside the config (state, sockets, logs) are ignored.

Debounce: watchfiles yields a group of changes once no new change came for
``step_ms`` (at most ``debounce_ms`` after the first one). An editor's atomic
save (write a temp file, rename it over the old one) and a burst of writes are
thus one reload; a reload that read a half-written file reports it as a config
error, and the write that completes it is another change, so the daemon always
converges on the last content. Watching restarts when the directories change
(``workflows_dir`` edited) or disappear and come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from loguru import logger
from watchfiles import Change, awatch

WORKFLOW_SUFFIXES = (".yaml", ".yml")


def is_config_path(path: str, config_path: str, workflows_dir: str | None) -> bool:
    """Whether a change to ``path`` can change the configuration."""
    path = os.path.abspath(path)
    if path == os.path.abspath(config_path):
        return True
    if workflows_dir is None:
        return False
    workflows_dir = os.path.abspath(workflows_dir)
    if path == workflows_dir:
        return True  # the directory itself was removed, replaced or renamed
    if os.path.dirname(path) != workflows_dir:
        return False
    name = os.path.basename(path)
    return not name.startswith(".") and name.endswith(WORKFLOW_SUFFIXES)


class ConfigWatcher:
    """Calls ``on_change(paths)`` (from the event loop) after config files changed."""

    def __init__(
        self,
        config_path: str,
        workflows_dir: str | None,
        on_change: Callable[[list[str]], None],
        *,
        debounce_ms: int = 1000,
        step_ms: int = 100,
    ) -> None:
        self.config_path = os.path.abspath(config_path)
        self.workflows_dir = os.path.abspath(workflows_dir) if workflows_dir else None
        self.on_change = on_change
        self.debounce_ms = debounce_ms
        self.step_ms = step_ms
        self._restart = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def directories(self) -> list[str]:
        dirs = [os.path.dirname(self.config_path)]
        if self.workflows_dir and self.workflows_dir not in dirs:
            dirs.append(self.workflows_dir)
        return [d for d in dirs if os.path.isdir(d)]

    def set_workflows_dir(self, workflows_dir: str | None) -> None:
        new = os.path.abspath(workflows_dir) if workflows_dir else None
        if new != self.workflows_dir:
            self.workflows_dir = new
            self._restart.set()

    def start(self) -> None:
        # Its "N changes detected" lines repeat ours ("reloading ... (file change: x)").
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        self._task = asyncio.create_task(self._run(), name="config-watcher")

    async def close(self) -> None:
        self._closed = True
        self._restart.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task

    def _filter(self, change: Change, path: str) -> bool:
        return is_config_path(path, self.config_path, self.workflows_dir)

    async def _run(self) -> None:
        while not self._closed:
            self._restart.clear()
            dirs = self.directories()
            watched = tuple(dirs)
            try:
                logger.debug("watching {} for config changes", ", ".join(dirs))
                async for changes in awatch(
                    *dirs,
                    watch_filter=self._filter,
                    debounce=self.debounce_ms,
                    step=self.step_ms,
                    stop_event=self._restart,
                    recursive=False,
                    rust_timeout=1000,
                    yield_on_timeout=True,
                ):
                    if changes:
                        paths = sorted({p for _, p in changes})
                        self.on_change(paths)
                    if tuple(self.directories()) != watched:
                        break  # a watched directory appeared or vanished: re-arm
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the watcher must never take the daemon down
                logger.warning("config watcher failed ({}); retrying in 1s", e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._restart.wait(), 1.0)
