"""Configuration: the daemon file and the workflow files, loaded into frozen dataclasses.

Everything wrong with a file is collected in one pass and reported as
``ConfigIssue``s (file, line, key path, message), so an operator fixes them all at
once. Connector ``config`` mappings are converted generically from the type hints
of the dataclass registered for the node's type (SOURCE_TYPES, TRANSFORM_TYPES,
SINK_TYPES) and the field metadata of ``dataflare.cdc.settings``.

Choices where DESIGN.md is silent:
- ``${VAR:-default}`` uses the default when VAR is unset *or empty* (shell rule);
  a ``$`` not followed by ``{`` or ``$`` is kept as written. Expansion applies to
  ``config``, ``error_handling``, the daemon settings and ``workflows_dir``, not to
  names, types or inputs (they define the graph's identity).
- A string holding a ``${...}`` reference may feed an int/float/bool field; a
  literal YAML string never does (no silent coercion: ``"5"`` is not an int).
- ``<key>_file`` paths are expanded too (``${CREDENTIALS_DIRECTORY}/pw``) and a
  relative one is read relative to the file that names it.
- A destination may list a source directly even when the workflow also has
  transformations (raw copy beside a filtered one).
- ``fingerprint()`` ignores ``description``, ``file`` and ``line``: moving a
  workflow file or editing its description does not restart replication.
- Issues that belong to no particular line (unreadable file, missing top-level
  key) are reported at line 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import hashlib
import json
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

from dataflare.cdc.errors import ConfigError
from dataflare.cdc.registry import SOURCE_TYPES, ConnectorType
from dataflare.cdc.settings import SECRET, UNIT, ConfigKeyError, duration
from dataflare.daemon.transform_registry import TRANSFORM_TYPES
from dataflare.sinks.registry import SINK_TYPES

if TYPE_CHECKING:
    from dataflare.daemon.yaml_located import LocatedYaml

# A key path into a document (as yaml_located.Path). yaml_located is imported where a
# file is parsed: workers unpickle these classes and need no YAML (~14 ms to import).
Path = tuple[str | int, ...]

DEFAULT_CONFIG_PATH = "/etc/dataflare/dataflare.yaml"
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
# Keys that hold credentials even when a connector forgot `secret()` metadata.
SECRET_KEYS = frozenset({"password", "dsn"})

# ---------------------------------------------------------------------------
# The contract: what the supervisor and the CLI consume.


@dataclass(frozen=True)
class ErrorHandling:
    retry_count: int = 5  # retries of a failing batch before on_error / a restart
    backoff: Literal["fixed", "exponential"] = "exponential"
    initial_backoff: float = duration(0.1)  # seconds; YAML "100ms"
    max_backoff: float = duration(30.0)
    jitter: bool = True  # exponential waits drawn from [wait/2, wait] ("equal jitter")
    # A record a transformation or destination rejects (bad data, HTTP 4xx): fail
    # the workflow, skip it (counted), or keep it as a dead letter (`dataflare dlq`).
    on_error: Literal["fail", "skip", "dead_letter"] = "fail"
    # Destinations: after this many failed attempts in a row the circuit opens and
    # writes pause for `circuit_breaker_reset` (the source waits; nothing is lost).
    circuit_breaker_threshold: int = 5
    circuit_breaker_reset: float = duration(30.0)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    type: str
    inputs: tuple[str, ...]
    config: Any  # the typed config dataclass registered for `type`
    error_handling: ErrorHandling
    file: str
    line: int


@dataclass(frozen=True)
class WorkflowConfig:
    name: str
    description: str
    file: str
    sources: tuple[NodeSpec, ...]
    transformations: tuple[NodeSpec, ...]
    destinations: tuple[NodeSpec, ...]
    drop_slot_on_remove: bool = False

    def fingerprint(self) -> str:
        """Stable hash of what the workflow does (secrets included, only hashed)."""

        def nodes(specs: tuple[NodeSpec, ...]) -> list[dict[str, Any]]:
            return [
                {
                    "name": n.name,
                    "type": n.type,
                    "inputs": list(n.inputs),
                    "config": _plain(n.config),
                    "error_handling": dataclasses.asdict(n.error_handling),
                }
                for n in sorted(specs, key=lambda n: n.name)
            ]

        doc = {
            "name": self.name,
            "drop_slot_on_remove": self.drop_slot_on_remove,
            "sources": nodes(self.sources),
            "transformations": nodes(self.transformations),
            "destinations": nodes(self.destinations),
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=_json_default)
        return hashlib.sha256(text.encode()).hexdigest()

    def slot_name(self) -> str:
        return "dataflare_" + re.sub(r"[^a-z0-9_]", "_", self.name.lower())


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: str = "/var/lib/dataflare"
    socket: str = "/run/dataflare/dataflare.sock"
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    metrics_listen: str | None = None


@dataclass(frozen=True)
class DaemonConfig:
    path: str  # absolute
    daemon: DaemonSettings
    workflows_dir: str  # absolute
    workflows: tuple[WorkflowConfig, ...]


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    key: str  # dotted key path, "" for the whole file
    message: str

    def __str__(self) -> str:
        if self.key:
            return f"{self.file}:{self.line}: {self.key}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


class ConfigInvalid(ConfigError):
    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = list(issues)
        lines = "\n".join(f"  {i}" for i in self.issues)
        super().__init__(f"invalid configuration ({len(self.issues)} issue(s)):\n{lines}")

    def __reduce__(self) -> tuple[type[ConfigInvalid], tuple[list[ConfigIssue]]]:
        # Survives pickling to and from worker processes with its issues intact.
        return (type(self), (self.issues,))


class SecretStr(str):
    """A secret value: a plain str to the code that uses it, hidden from repr().

    Config dataclasses are written by connector authors and show every field in
    their repr; wrapping the value is what keeps a DSN out of logs and tracebacks.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def default_config_path() -> str:
    return os.environ.get("DATAFLARE_CONFIG") or DEFAULT_CONFIG_PATH


def load_workflow_file(path: str, env: Mapping[str, str] | None = None) -> WorkflowConfig:
    """One workflow file; raises ConfigInvalid listing every issue in it."""
    doc, issues = _parse_file(path)
    workflow = None
    if doc is not None:
        workflow, issues = _workflow_from_doc(doc, path, _env(env), issues)
    if workflow is None:
        raise ConfigInvalid(issues)
    return workflow


def load_daemon_config(
    path: str, env: Mapping[str, str] | None = None
) -> tuple[DaemonConfig, list[ConfigIssue]]:
    """The daemon file and every workflow in its workflows_dir.

    An error in the daemon file itself raises ConfigInvalid (the caller keeps its
    last good configuration); an invalid workflow file is left out of
    ``.workflows`` and its issues are returned, so the good workflows still run.
    """
    loaded = _load_daemon(path, _env(env))
    if loaded.config is None:
        raise ConfigInvalid(loaded.daemon_issues + loaded.workflow_issues)
    return loaded.config, loaded.workflow_issues


def validate_paths(paths: Sequence[str], env: Mapping[str, str] | None = None) -> list[ConfigIssue]:
    """Issues of daemon files (with their workflows) and workflow files, in file order."""
    return _validate(paths, _env(env))[0]


def validate_main(argv: Sequence[str]) -> int:
    """`dataflare validate [PATH...]`: 0 when everything is valid, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="dataflare validate",
        description="Check a daemon file (with all its workflows) or workflow files.",
    )
    parser.add_argument(
        "paths", nargs="*", metavar="PATH", help=f"default: {default_config_path()}"
    )
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # --help or a usage error; argparse already printed
        return e.code if isinstance(e.code, int) else 2
    paths: list[str] = args.paths or [default_config_path()]
    issues, workflows = _validate(paths, _env(None))
    for issue in issues:
        print(issue)
    if issues:
        files = len({i.file for i in issues})
        print(f"FAILED: {len(issues)} issue(s) in {files} file(s)")
        return 1
    print(f"OK: {workflows} workflow(s)")
    return 0


# ---------------------------------------------------------------------------
# Files and the daemon file.


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _parse_file(path: str) -> tuple[LocatedYaml | None, list[ConfigIssue]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        return None, [ConfigIssue(path, 1, "", "file is not UTF-8 text")]
    except OSError as e:
        return None, [ConfigIssue(path, 1, "", f"cannot read file: {e.strerror or e}")]
    from dataflare.daemon.yaml_located import load_located

    doc, problems = load_located(text)
    issues = [ConfigIssue(path, p.line, _key(p.path), p.message) for p in problems]
    return doc, issues


def _is_daemon_doc(doc: LocatedYaml) -> bool:
    return isinstance(doc.data, dict) and ("daemon" in doc.data or "workflows_dir" in doc.data)


@dataclass
class _LoadedDaemon:
    config: DaemonConfig | None
    daemon_issues: list[ConfigIssue]
    workflow_issues: list[ConfigIssue]
    workflows: int = 0  # valid workflows, also when the daemon file is not


def _load_daemon(path: str, env: Mapping[str, str]) -> _LoadedDaemon:
    doc, issues = _parse_file(path)
    if doc is None:
        return _LoadedDaemon(None, issues, [])
    return _daemon_from_doc(doc, path, env, issues)


def _daemon_from_doc(
    doc: LocatedYaml,
    path: str,
    env: Mapping[str, str],
    yaml_issues: list[ConfigIssue],
    names: dict[str, str] | None = None,
    done: set[str] | None = None,
) -> _LoadedDaemon:
    """``names`` (workflow name -> file) and ``done`` (real paths already checked)
    carry across the paths given to `dataflare validate`."""
    r = _Reader(path, doc, env)
    r.issues.extend(yaml_issues)
    data = doc.data
    base = os.path.dirname(os.path.abspath(path))
    if not isinstance(data, dict):
        r.issue((), "expected a mapping with `daemon:` and `workflows_dir:`")
        return _LoadedDaemon(None, r.sorted(), [])
    r.unknown_keys(data, (), ("daemon", "workflows_dir"))

    settings = DaemonSettings()
    raw = data.get("daemon")
    if raw is not None:
        built = r.value(raw, DaemonSettings, ("daemon",), _Opts(expand=True))
        if isinstance(built, DaemonSettings):
            # The state lives next to the config when given relative (tests, demos).
            state_dir = os.path.normpath(os.path.join(base, built.state_dir))
            level = built.log_level.upper()
            settings = dataclasses.replace(built, state_dir=state_dir, log_level=level)

    workflows_dir: str | None = None
    raw_dir = data.get("workflows_dir", "workflows.d")
    expanded = r.value(raw_dir, str, ("workflows_dir",), _Opts(expand=True))
    if isinstance(expanded, str):
        workflows_dir = os.path.normpath(os.path.join(base, expanded))
        if not os.path.isdir(workflows_dir):
            r.issue(("workflows_dir",), f"workflows directory {workflows_dir} does not exist")
            workflows_dir = None

    files: list[str] = []
    if workflows_dir is not None:
        try:
            files = _workflow_files(workflows_dir)
        except OSError as e:
            r.issue(("workflows_dir",), f"cannot list {workflows_dir}: {e.strerror or e}")
            workflows_dir = None

    if done is not None:
        files = [f for f in files if os.path.realpath(f) not in done]
        done.update(os.path.realpath(f) for f in files)
    # Workflows are checked even when the daemon file is bad: validate shows all.
    workflows, workflow_issues = _load_workflows(files, env, names)
    daemon_issues = r.sorted()
    if daemon_issues or workflows_dir is None:
        return _LoadedDaemon(None, daemon_issues, workflow_issues, len(workflows))
    config = DaemonConfig(os.path.abspath(path), settings, workflows_dir, tuple(workflows))
    return _LoadedDaemon(config, [], workflow_issues, len(workflows))


def _check_settings(values: Mapping[str, Any], raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = []
    level = values.get("log_level")
    if isinstance(level, str) and level.upper() not in LOG_LEVELS:
        problems.append(("log_level", "must be one of: " + ", ".join(LOG_LEVELS)))
    listen = values.get("metrics_listen")
    if isinstance(listen, str):
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(("metrics_listen", "expected host:port, e.g. 127.0.0.1:9187"))
        elif host.startswith("[") != host.endswith("]"):
            problems.append(("metrics_listen", "unbalanced brackets around an IPv6 address"))
    return problems


def _check_error_handling(
    values: Mapping[str, Any], raw: Mapping[str, Any]
) -> list[tuple[str, str]]:
    problems = []
    if values.get("retry_count", 0) < 0:
        problems.append(("retry_count", "must be 0 or more"))
    initial, top = values.get("initial_backoff"), values.get("max_backoff")
    if initial is not None and initial <= 0:
        problems.append(("initial_backoff", "must be more than 0"))
    elif initial is not None and top is not None and top < initial:
        where = "max_backoff" if "max_backoff" in raw else "initial_backoff"
        problems.append((where, "max_backoff must not be less than initial_backoff"))
    return problems


# Checks beyond types, per dataclass: given the fields that converted (with defaults
# for those not written) and the raw mapping, they return (field, message) pairs.
# They run even when other fields failed, so one pass reports everything.
_CHECKS: dict[type, Callable[[Mapping[str, Any], Mapping[str, Any]], list[tuple[str, str]]]] = {
    DaemonSettings: _check_settings,
    ErrorHandling: _check_error_handling,
}


def _workflow_files(directory: str) -> list[str]:
    names = []
    for name in os.listdir(directory):
        # Editors' lock, swap and backup files (`.#x.yaml`, `.x.yaml.swp`, `x.yaml~`)
        # are hidden or have another suffix; a half-saved file must not be loaded.
        if name.startswith(".") or not name.endswith((".yaml", ".yml")):
            continue
        full = os.path.join(directory, name)
        if os.path.isfile(full):
            names.append(full)
    return sorted(names)


def _load_workflows(
    files: Sequence[str], env: Mapping[str, str], seen: dict[str, str] | None = None
) -> tuple[list[WorkflowConfig], list[ConfigIssue]]:
    """Workflow files in order; a name already taken (in ``seen``) is an issue."""
    seen = {} if seen is None else seen
    workflows: list[WorkflowConfig] = []
    issues: list[ConfigIssue] = []
    for file in files:
        doc, file_issues = _parse_file(file)
        workflow = None
        if doc is not None:
            workflow, file_issues = _workflow_from_doc(doc, file, env, file_issues)
        if workflow is not None and workflow.name in seen:
            line = doc.line(("name",)) if doc is not None else 1
            message = f"workflow name {workflow.name!r} is already used by {seen[workflow.name]}"
            file_issues = [ConfigIssue(file, line, "name", message)]
            workflow = None
        if workflow is None:
            issues.extend(file_issues)
            continue
        seen[workflow.name] = file
        workflows.append(workflow)
    return workflows, issues


def _validate(paths: Sequence[str], env: Mapping[str, str]) -> tuple[list[ConfigIssue], int]:
    issues: list[ConfigIssue] = []
    done: set[str] = set()  # a workflow file named beside its daemon file counts once
    names: dict[str, str] = {}
    count = 0
    for path in paths:
        real = os.path.realpath(path)
        if real in done:
            continue
        done.add(real)
        doc, file_issues = _parse_file(path)
        if doc is not None and _is_daemon_doc(doc):
            loaded = _daemon_from_doc(doc, path, env, file_issues, names, done)
            issues.extend(loaded.daemon_issues + loaded.workflow_issues)
            count += loaded.workflows
        elif doc is None:
            issues.extend(file_issues)
        else:
            workflows, wf_issues = _load_workflows([path], env, names)
            issues.extend(wf_issues)
            count += len(workflows)
    return issues, count


# ---------------------------------------------------------------------------
# Workflow files.

_SECTIONS: tuple[tuple[str, str, Mapping[str, ConnectorType]], ...] = (
    ("sources", "source", SOURCE_TYPES),
    ("transformations", "transformation", TRANSFORM_TYPES),
    ("destinations", "destination", SINK_TYPES),
)
_WORKFLOW_KEYS = (
    "name",
    "description",
    "sources",
    "transformations",
    "destinations",
    "drop_slot_on_remove",
)
_NODE_KEYS = ("type", "config", "inputs", "error_handling")


@dataclass
class _Draft:
    """What the DAG checks need of a node, even when its config is invalid."""

    section: str
    name: str
    line: int
    inputs: list[tuple[str, Path]]  # (name, path of the list item)
    inputs_ok: bool  # False when `inputs` was missing or malformed
    spec: NodeSpec | None


def _workflow_from_doc(
    doc: LocatedYaml, file: str, env: Mapping[str, str], yaml_issues: list[ConfigIssue]
) -> tuple[WorkflowConfig | None, list[ConfigIssue]]:
    r = _Reader(file, doc, env)
    r.issues.extend(yaml_issues)  # duplicate keys and the like: the file is still read
    data = doc.data
    if not isinstance(data, dict):
        what = "the file is empty" if data is None else "the top level is not a mapping"
        r.issue((), f"{what}; expected a mapping with name, sources and destinations")
        return None, r.sorted()
    r.unknown_keys(data, (), _WORKFLOW_KEYS)

    stem = os.path.splitext(os.path.basename(file))[0]
    name = r.value(data.get("name", stem), str, ("name",), _Opts())
    if name == "":
        r.issue(("name",), "must not be empty")
    raw_description = data.get("description")
    description = r.value(
        "" if raw_description is None else raw_description, str, ("description",), _Opts()
    )
    drop = r.value(data.get("drop_slot_on_remove", False), bool, ("drop_slot_on_remove",), _Opts())

    drafts: list[_Draft] = []
    complete = True  # every section readable: only then can "unused" be judged
    for section, kind, registry in _SECTIONS:
        raw = data.get(section)
        if raw is None:
            if section != "transformations":
                complete = False
                r.issue((section,), f"at least one {kind} is required")
            continue
        if not isinstance(raw, dict):
            complete = False
            r.issue((section,), f"expected a mapping of {kind} names to {kind}s")
            continue
        if not raw and section != "transformations":
            complete = False
            r.issue((section,), f"at least one {kind} is required")
        for node_name, node_raw in raw.items():
            drafts.append(r.node(section, kind, registry, node_name, node_raw))

    _check_dag(r, drafts, complete)
    issues = r.sorted()
    if issues:
        return None, issues
    assert isinstance(name, str) and isinstance(description, str) and isinstance(drop, bool)

    def specs(section: str) -> tuple[NodeSpec, ...]:
        return tuple(d.spec for d in drafts if d.section == section and d.spec is not None)

    workflow = WorkflowConfig(
        name=name,
        description=description,
        file=file,
        sources=specs("sources"),
        transformations=specs("transformations"),
        destinations=specs("destinations"),
        drop_slot_on_remove=drop,
    )
    return workflow, []


def _check_dag(r: _Reader, drafts: list[_Draft], complete: bool) -> None:
    by_name: dict[str, _Draft] = {}
    for d in sorted(drafts, key=lambda d: d.line):
        first = by_name.setdefault(d.name, d)
        if first is not d:
            message = f"node name {d.name!r} is already used by {first.section}.{d.name}"
            r.issue((d.section, d.name), f"{message} (line {first.line}); names must be unique")

    consumers: dict[str, list[str]] = {name: [] for name in by_name}
    wired = complete and all(d.inputs_ok for d in drafts)
    for d in drafts:
        for target, path in d.inputs:
            node = by_name.get(target)
            if node is None:
                wired = False
                r.issue(path, f"unknown input {target!r}" + _suggest(target, list(by_name)))
            elif node.section == "destinations":
                wired = False
                r.issue(path, f"{target!r} is a destination; destinations have no output")
            elif target == d.name and d.section == "transformations":
                pass  # reported as a cycle below
            else:
                consumers[target].append(d.name)

    # "Unused" only when the wiring is otherwise sound: a typo in `inputs` would
    # otherwise be reported twice (unknown input + unused source).
    if wired:
        for d in drafts:
            if d.section != "destinations" and not consumers.get(d.name) and by_name[d.name] is d:
                kind = "source" if d.section == "sources" else "transformation"
                r.issue(
                    (d.section, d.name),
                    f"{kind} is not used: no transformation or destination lists it in `inputs`",
                )
    if wired:
        for d in drafts:
            if d.spec is not None and d.spec.type == "route" and by_name[d.name] is d:
                _check_route_targets(r, d, consumers.get(d.name, []))
    cycles = _cycles(drafts, by_name)
    if wired and not cycles:
        _check_diamonds(r, drafts, by_name)
    for cycle in cycles:
        start = min(cycle, key=lambda n: by_name[n].line)
        i = cycle.index(start)
        ordered = cycle[i:] + cycle[:i]
        text = " -> ".join([*ordered, start])
        r.issue(("transformations", start, "inputs"), f"inputs form a cycle: {text}")


def _check_diamonds(r: _Reader, drafts: list[_Draft], by_name: dict[str, _Draft]) -> None:
    """A node must not get one source's changes along two paths: the copies would
    arrive one after the other, and a delete that one branch derives (a row leaving
    a filter or route) could undo the row the other branch wrote."""
    sources_of: dict[str, set[str]] = {}

    def reach(name: str, stack: tuple[str, ...] = ()) -> set[str]:
        found = sources_of.get(name)
        if found is not None:
            return found
        d = by_name[name]
        if d.section == "sources":
            found = {name}
        else:
            found = set()
            for i, _ in d.inputs:
                if i in by_name and i not in stack:
                    found |= reach(i, (*stack, name))
        sources_of[name] = found
        return found

    for d in drafts:
        if len(d.inputs) < 2 or by_name.get(d.name) is not d:
            continue
        seen: dict[str, str] = {}
        for i, path in d.inputs:
            if i not in by_name:
                continue
            for s in sorted(reach(i)):
                if s in seen and seen[s] != i:
                    r.issue(
                        path,
                        f"{d.name!r} would receive the changes of source {s!r} twice "
                        f"(through {seen[s]!r} and {i!r}); give each path its own destination",
                    )
                    break
                seen.setdefault(s, i)


def _check_route_targets(r: _Reader, d: _Draft, takers: list[str]) -> None:
    """A route sends only to nodes that list it in `inputs`, and each of those is
    named by a route or `default` (else it would silently receive nothing)."""
    assert d.spec is not None
    cfg = d.spec.config
    named: set[str] = set()
    base: Path = ("transformations", d.name, "config")
    targets: list[tuple[Path, list[str]]] = [
        (("routes", i, "to"), rt.to) for i, rt in enumerate(cfg.routes)
    ]
    targets.append((("default",), cfg.default))
    for where, names in targets:
        for j, target in enumerate(names):
            named.add(target)
            if target not in takers:
                hint = _suggest(target, takers) if takers else ""
                r.issue(
                    (*base, *where, j),
                    f"{target!r} does not list {d.name!r} in its `inputs`" + hint,
                )
    for taker in takers:
        if taker not in named:
            r.issue(
                (*base, "routes"),
                f"{taker!r} takes this route as input but no route or `default` sends to it",
            )


def _cycles(drafts: list[_Draft], by_name: dict[str, _Draft]) -> list[list[str]]:
    """Each distinct cycle among transformations once (sources and destinations
    cannot be on one: the first has no inputs, the second no consumers)."""
    graph = {
        d.name: [t for t, _ in d.inputs if t in by_name and by_name[t].section == "transformations"]
        for d in drafts
        if d.section == "transformations" and by_name[d.name] is d
    }
    found: list[list[str]] = []
    seen_sets: set[frozenset[str]] = set()
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycle = stack[stack.index(node) :]
            if frozenset(cycle) not in seen_sets:
                seen_sets.add(frozenset(cycle))
                found.append(cycle)
            return
        if node in done:
            return
        stack.append(node)
        for nxt in graph.get(node, []):
            visit(nxt, stack)
        stack.pop()
        done.add(node)

    for name in graph:
        visit(name, [])
    return found


# ---------------------------------------------------------------------------
# Generic conversion of YAML values into typed dataclasses.


class _Invalid:
    """Marks a value that could not be converted (its issue is already recorded)."""


_INVALID = _Invalid()


@dataclass(frozen=True)
class _Opts:
    unit: str | None = None  # "duration" | "bytes" from the field metadata
    secret: bool = False
    expand: bool = False  # ${VAR} expansion of strings


_VAR_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h|d)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_BYTE_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]i?b|b)?", re.IGNORECASE)
_BYTE_UNITS: dict[str, int] = {"b": 1} | {
    f"{p}{s}": base**e
    for e, p in enumerate("kmgtp", start=1)
    for s, base in (("b", 1000), ("ib", 1024))
}


class _Reader:
    """Issue collection and conversion for one file."""

    def __init__(self, file: str, doc: LocatedYaml, env: Mapping[str, str]) -> None:
        self.file = file
        self.doc = doc
        self.env = env
        self.base_dir = os.path.dirname(os.path.abspath(file))
        self.issues: list[ConfigIssue] = []

    def issue(self, path: Path, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, self.doc.line(path), _key(path), message))

    def sorted(self) -> list[ConfigIssue]:
        return sorted(self.issues, key=lambda i: i.line)

    def unknown_keys(self, data: Mapping[str, Any], path: Path, known: Sequence[str]) -> bool:
        ok = True
        for key in data:
            if key not in known:
                ok = False
                self.issue((*path, key), _unknown_key(key, known))
        return ok

    # -- workflow nodes

    def node(
        self,
        section: str,
        kind: str,
        registry: Mapping[str, ConnectorType],
        name: str,
        raw: Any,
    ) -> _Draft:
        path: Path = (section, name)
        draft = _Draft(section, name, self.doc.line(path), [], True, None)
        if not isinstance(raw, dict):
            self.issue(path, f"expected a mapping with `type` and `config` for this {kind}")
            draft.inputs_ok = section == "sources"
            return draft
        ok = self.unknown_keys(raw, path, _NODE_KEYS)

        connector: ConnectorType | None = None
        node_type = raw.get("type")
        if node_type is None:
            ok = False
            self.issue((*path, "type"), f"required key is missing ({kind} type)")
        elif not isinstance(node_type, str):
            ok = False
            self.issue((*path, "type"), f"expected a string, got {_kind(node_type)}")
        else:
            connector = registry.get(node_type)
            if connector is None:
                ok = False
                self.issue((*path, "type"), _unknown_type(kind, node_type, registry))

        inputs: tuple[str, ...] = ()
        if section == "sources":
            if "inputs" in raw:
                ok = False
                self.issue((*path, "inputs"), "a source takes no inputs")
        else:
            draft.inputs, draft.inputs_ok = self.node_inputs(raw.get("inputs"), path, kind)
            inputs = tuple(n for n, _ in draft.inputs)
            ok = ok and draft.inputs_ok

        handling = ErrorHandling()
        raw_handling = raw.get("error_handling")
        if raw_handling is not None:
            built = self.value(
                raw_handling, ErrorHandling, (*path, "error_handling"), _Opts(expand=True)
            )
            if isinstance(built, ErrorHandling):
                handling = built
            else:
                ok = False

        config: Any = _INVALID
        if connector is not None:
            raw_config = raw.get("config")
            if raw_config is None:
                raw_config = {}  # `config:` left out or empty: all defaults
            config = self.value(raw_config, connector.config, (*path, "config"), _Opts(expand=True))
        if ok and not isinstance(config, _Invalid) and isinstance(node_type, str):
            draft.spec = NodeSpec(name, node_type, inputs, config, handling, self.file, draft.line)
        return draft

    def node_inputs(self, raw: Any, path: Path, kind: str) -> tuple[list[tuple[str, Path]], bool]:
        ipath = (*path, "inputs")
        if raw is None or raw == []:
            self.issue(ipath, f"a {kind} needs inputs: a list of source or transformation names")
            return [], False
        if not isinstance(raw, list):
            self.issue(ipath, f"expected a list of node names, got {_kind(raw)}")
            return [], False
        out: list[tuple[str, Path]] = []
        ok = True
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                ok = False
                self.issue((*ipath, i), f"expected a node name, got {_kind(item)}")
            elif any(item == n for n, _ in out):
                ok = False
                self.issue((*ipath, i), f"{item!r} is listed twice")
            else:
                out.append((item, (*ipath, i)))
        return out, ok

    # -- values

    def value(self, raw: Any, hint: Any, path: Path, opts: _Opts) -> Any:
        """``raw`` converted to ``hint``, or _INVALID after recording why."""
        templated = False
        if opts.expand and isinstance(raw, str):
            templated = "$" in raw
            expanded = self.expand(raw, path)
            if expanded is None:
                return _INVALID
            raw = expanded
        return self.convert(raw, hint, path, opts, templated)

    def expand(self, text: str, path: Path) -> str | None:
        ok = True

        def substitute(m: re.Match[str]) -> str:
            nonlocal ok
            if m.group(0) == "$$":
                return "$"
            var, default = m.group(1), m.group(2)
            if var is None:
                ok = False
                self.issue(path, "invalid ${...} reference: expected ${NAME} or ${NAME:-default}")
                return ""
            value = self.env.get(var)
            if value:
                return value
            if default is not None:
                return default
            if value is None:
                ok = False
                self.issue(
                    path,
                    f"environment variable {var} is not set "
                    f"(use ${{{var}:-default}} to give a default)",
                )
            return ""

        result = _VAR_REF.sub(substitute, text)
        return result if ok else None

    def convert(self, raw: Any, hint: Any, path: Path, opts: _Opts, templated: bool) -> Any:
        origin, args = get_origin(hint), get_args(hint)
        if hint is Any or hint is object:
            return self.expand_any(raw, path) if opts.expand else raw
        if origin in (Union, types.UnionType):
            return self.union(raw, args, path, opts, templated)
        if origin is Literal:
            return self.literal(raw, args, path, opts, templated)
        if raw is None:
            return self.fail(path, f"has no value (expected {_describe(hint)})")
        if opts.unit == "duration":
            return self.duration(raw, path, opts, templated)
        if opts.unit == "bytes":
            return self.byte_size(raw, path, opts, templated)
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            if not isinstance(raw, dict):
                return self.fail(path, f"expected a mapping, got {_kind(raw)}")
            return self.dataclass(hint, raw, path, opts.expand)
        if origin in (list, tuple, set, frozenset, Sequence):
            return self.sequence(raw, hint, path, opts)
        if origin in (dict, Mapping):
            return self.mapping(raw, args, path, opts)
        if hint in (str, int, float, bool):
            return self.scalar(raw, hint, path, opts, templated)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            allowed = [m.value for m in hint]
            found = self.literal(raw, tuple(allowed), path, opts, templated)
            return found if isinstance(found, _Invalid) else hint(found)
        return self.fail(path, f"cannot be set from YAML (unsupported type {hint!r})")

    def fail(self, path: Path, message: str) -> _Invalid:
        self.issue(path, message)
        return _INVALID

    def expand_any(self, raw: Any, path: Path) -> Any:
        if isinstance(raw, str):
            return self.value(raw, str, path, _Opts(expand=True))
        if isinstance(raw, list):
            return [self.expand_any(v, (*path, i)) for i, v in enumerate(raw)]
        if isinstance(raw, dict):
            return {k: self.expand_any(v, (*path, k)) for k, v in raw.items()}
        return raw

    def scalar(self, raw: Any, hint: type, path: Path, opts: _Opts, templated: bool) -> Any:
        if hint is str and isinstance(raw, str):
            return SecretStr(raw) if opts.secret else raw
        if hint is bool and isinstance(raw, bool):
            return raw
        if hint is int and isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if hint is float and isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        if templated and isinstance(raw, str):
            # The text came from the environment: parse it like YAML would have.
            parsed = _parse_text(raw.strip(), hint)
            if parsed is not None:
                return parsed
            return self.fail(path, f"expected {_describe(hint)} from the environment variable")
        message = f"expected {_describe(hint)}, got {_kind(raw)}"
        if hint is str and isinstance(raw, int | float) and not opts.secret:
            message += " (quote the value to use it as text)"
        return self.fail(path, message)

    def union(
        self, raw: Any, args: tuple[Any, ...], path: Path, opts: _Opts, templated: bool
    ) -> Any:
        if raw is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        # The member whose shape fits the value reports the detailed issues.
        for member in sorted(members, key=lambda m: not _shape_fits(m, raw, templated)):
            scratch = _Reader(self.file, self.doc, self.env)
            result = scratch.convert(raw, member, path, opts, templated)
            if not isinstance(result, _Invalid):
                return result
            if _shape_fits(member, raw, templated) or len(members) == 1:
                self.issues.extend(scratch.issues)
                return _INVALID
        wanted = " or ".join(_describe(m) for m in args)
        return self.fail(path, f"expected {wanted}, got {_kind(raw)}")

    def literal(
        self, raw: Any, allowed: tuple[Any, ...], path: Path, opts: _Opts, templated: bool
    ) -> Any:
        for choice in allowed:
            if type(raw) is type(choice) and raw == choice:
                return choice
        message = "must be one of: " + ", ".join(str(a) for a in allowed)
        return self.fail(path, message + _got(raw, opts, templated))

    def duration(self, raw: Any, path: Path, opts: _Opts, templated: bool) -> Any:
        seconds = _parse_duration(raw)
        if seconds is None:
            message = "expected a duration such as 20ms, 1.5s, 2m or 1h, or a number of seconds"
            return self.fail(path, message + _got(raw, opts, templated))
        return seconds

    def byte_size(self, raw: Any, path: Path, opts: _Opts, templated: bool) -> Any:
        size = _parse_byte_size(raw)
        if size is None:
            message = "expected a size such as 64MiB, 512KB or 1GB, or a number of bytes"
            return self.fail(path, message + _got(raw, opts, templated))
        return size

    def sequence(self, raw: Any, hint: Any, path: Path, opts: _Opts) -> Any:
        origin, args = get_origin(hint), get_args(hint)
        if not isinstance(raw, list):
            return self.fail(path, f"expected a list, got {_kind(raw)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(raw) != len(args):
                return self.fail(path, f"expected a list of {len(args)} items, got {len(raw)}")
            item_hints = list(args)
        else:
            item_hints = [args[0] if args else Any] * len(raw)
        items = [
            self.value(item, h, (*path, i), opts)
            for i, (item, h) in enumerate(zip(raw, item_hints, strict=True))
        ]
        if any(isinstance(i, _Invalid) for i in items):
            return _INVALID
        if origin in (tuple, set, frozenset):
            return origin(items)
        return items

    def mapping(self, raw: Any, args: tuple[Any, ...], path: Path, opts: _Opts) -> Any:
        if not isinstance(raw, dict):
            return self.fail(path, f"expected a mapping, got {_kind(raw)}")
        value_hint = args[1] if len(args) == 2 else Any
        out = {k: self.value(v, value_hint, (*path, k), opts) for k, v in raw.items()}
        if any(isinstance(v, _Invalid) for v in out.values()):
            return _INVALID
        return out

    def dataclass(self, cls: type, raw: dict[str, Any], path: Path, expand: bool) -> Any:
        hints = _hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        secrets = {n for n, f in fields.items() if f.metadata.get(SECRET) or n in SECRET_KEYS}
        file_keys = {f"{n}_file": n for n in secrets if f"{n}_file" not in fields}
        kwargs: dict[str, Any] = {}
        ok = True
        failed: set[str] = set()
        for key, item in raw.items():
            kpath = (*path, key)
            target = key if key in fields else file_keys.get(key)
            if target is None:
                ok = False
                self.issue(kpath, _unknown_key(key, [*fields, *file_keys]))
                continue
            f = fields[target]
            opts = _Opts(f.metadata.get(UNIT), target in secrets, expand)
            if key == target:
                value = self.value(item, hints[target], kpath, opts)
            elif target in raw:
                value = self.fail(kpath, f"give either {target} or {key}, not both")
            else:
                value = self.secret_file(item, kpath, expand)
                if not isinstance(value, _Invalid):
                    value = self.convert(value, hints[target], kpath, opts, templated=True)
            if isinstance(value, _Invalid):
                ok = False
                failed.add(target)
            else:
                kwargs[target] = value
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in raw and f"{name}_file" not in raw:
                ok = False
                self.issue((*path, name), "required key is missing")
        check = _CHECKS.get(cls)
        if check is not None:
            defaults = {
                n: f.default
                for n, f in fields.items()
                if f.default is not dataclasses.MISSING and n not in failed
            }
            for name, message in check(defaults | kwargs, raw):
                ok = False
                self.issue((*path, name), message)
        if not ok:
            return _INVALID
        try:
            return cls(**kwargs)
        except ConfigKeyError as e:
            return self.fail((*path, *e.key_path), e.message)
        except (TypeError, ValueError, ConfigError) as e:
            # A connector's own checks in __post_init__; their messages hold no secrets.
            return self.fail(path, str(e))

    def secret_file(self, raw: Any, path: Path, expand: bool) -> str | _Invalid:
        location = self.value(raw, str, path, _Opts(expand=expand))
        if isinstance(location, _Invalid):
            return location
        full = os.path.join(self.base_dir, location)
        try:
            with open(full, encoding="utf-8") as f:
                content = f.read()
        except UnicodeDecodeError:
            return self.fail(path, f"{full} is not UTF-8 text")
        except OSError as e:
            return self.fail(path, f"cannot read {full}: {e.strerror or type(e).__name__}")
        # Exactly one newline: `echo secret > file` adds it; anything more is content.
        return content[:-1] if content.endswith("\n") else content


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _key(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _suggest(word: str, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _unknown_key(key: str, known: Sequence[str]) -> str:
    suggestion = _suggest(key, known)
    if suggestion:
        return "unknown key" + suggestion
    return "unknown key; known keys: " + (", ".join(sorted(known)) or "(none)")


def _unknown_type(kind: str, name: str, registry: Mapping[str, ConnectorType]) -> str:
    if not registry:
        return f"unknown {kind} type {name!r}: no {kind} types are available yet"
    known = ", ".join(sorted(registry))
    return f"unknown {kind} type {name!r}{_suggest(name, list(registry))}; known types: {known}"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    for t, name in names.items():
        if isinstance(value, t):
            return name
    return f"a {type(value).__name__}"


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if hint is type(None):
        return "nothing (null)"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    simple = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if hint in simple:
        return simple[hint]
    if origin in (list, tuple, set, frozenset, Sequence):
        return "a list"
    if origin in (dict, Mapping) or dataclasses.is_dataclass(hint):
        return "a mapping"
    return str(getattr(hint, "__name__", hint))


def _shape_fits(hint: Any, raw: Any, templated: bool) -> bool:
    """Whether ``raw`` is the kind of YAML value ``hint`` is written as."""
    origin = get_origin(hint)
    if origin in (list, tuple, set, frozenset, Sequence):
        return isinstance(raw, list)
    if origin in (dict, Mapping) or dataclasses.is_dataclass(hint):
        return isinstance(raw, dict)
    if origin is Literal:
        return any(type(raw) is type(a) for a in get_args(hint))
    if hint is str:
        return isinstance(raw, str)
    if hint in (int, float, bool):
        scalar_ok = isinstance(raw, bool) if hint is bool else _is_number(raw)
        return scalar_ok or (templated and isinstance(raw, str))
    return False


def _is_number(raw: Any) -> bool:
    return isinstance(raw, int | float) and not isinstance(raw, bool)


def _got(raw: Any, opts: _Opts, templated: bool) -> str:
    # Echo what was written, unless it is secret or came from the environment.
    if opts.secret or templated or not isinstance(raw, str | int | float) or len(str(raw)) > 60:
        return ""
    return f" (got {raw!r})"


def _parse_text(text: str, hint: type) -> Any:
    """An int/float/bool from environment text, or None."""
    if hint is bool:
        return {
            "true": True,
            "yes": True,
            "on": True,
            "1": True,
            "false": False,
            "no": False,
            "off": False,
            "0": False,
        }.get(text.lower())
    try:
        return int(text) if hint is int else float(text)
    except ValueError:
        return None


def _parse_duration(raw: Any) -> float | None:
    """Seconds from a number or text such as "20ms", "1.5s", "2m", "1h30m"."""
    if _is_number(raw):
        return float(raw) if raw >= 0 else None
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    try:
        seconds = float(text)  # "1.5": seconds, as a bare YAML number would be
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total if text and pos == len(text) else None


def _parse_byte_size(raw: Any) -> int | None:
    """Bytes from a number or text such as "64MiB", "1GB", "512 KB"."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw if raw >= 0 else None
    if not isinstance(raw, str):
        return None
    m = _BYTE_SIZE.fullmatch(raw.strip())
    if m is None:
        return None
    number, unit = m.group(1), (m.group(2) or "b").lower()
    # Exact arithmetic: "1.1MB" is 1100000 bytes, not 1100000.0000000002.
    whole, _, frac = number.partition(".")
    scale: int = 10 ** len(frac)
    numerator = (int(whole or "0") * scale + int(frac or "0")) * _BYTE_UNITS[unit]
    if numerator % scale:
        return None
    return numerator // scale


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return repr(value)
