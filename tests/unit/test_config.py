"""Config loading and validation: typed connector configs, DAG checks, line numbers."""

from __future__ import annotations

import pickle
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from dataflare.cdc.registry import SOURCE_TYPES, ConnectorType
from dataflare.cdc.settings import byte_size, duration, secret
from dataflare.daemon.config import (
    ConfigInvalid,
    ConfigIssue,
    DaemonSettings,
    ErrorHandling,
    SecretStr,
    WorkflowConfig,
    default_config_path,
    load_daemon_config,
    load_workflow_file,
    validate_main,
    validate_paths,
)
from dataflare.daemon.transform_registry import TRANSFORM_TYPES
from dataflare.daemon.yaml_located import load_located
from dataflare.sinks.registry import SINK_TYPES

REPO = Path(__file__).resolve().parents[2]

# Connector configs of our own, so these tests follow the loader and not the
# evolving real connectors (one test below covers the shipped example files).


@dataclass(frozen=True)
class Auth:
    user: str
    password: str | None = None  # secret by name


@dataclass(frozen=True)
class FakeSourceConfig:
    dsn: str  # required; secret by name
    tables: list[str] = field(default_factory=list)
    snapshot: Literal["initial", "never"] = "initial"
    batch_size: int = 5000
    batch_timeout: float = duration(0.02)
    ring_size: int = byte_size(64 * 1024 * 1024)
    ratio: float = 1.0
    enabled: bool = True
    token: str | None = secret()
    headers: dict[str, str] = field(default_factory=dict)
    auth: Auth | None = None
    heartbeat: float | None = duration(None)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FakeTransformConfig:
    condition: str = "true"


@dataclass(frozen=True)
class FakeSinkConfig:
    url: str = "memory://"
    password: str | None = None


@pytest.fixture(autouse=True)
def fake_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SOURCE_TYPES, "fake", ConnectorType(FakeSourceConfig, "x:Source"))
    monkeypatch.setitem(TRANSFORM_TYPES, "pass", ConnectorType(FakeTransformConfig, "x:T"))
    monkeypatch.setitem(SINK_TYPES, "memory", ConnectorType(FakeSinkConfig, "x:Sink"))
    monkeypatch.delenv("DATAFLARE_CONFIG", raising=False)


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def issues_of(path: str, env: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigInvalid) as info:
        load_workflow_file(path, env=env or {})
    return info.value.issues


def keyed(issues: list[ConfigIssue]) -> list[tuple[int, str]]:
    return [(i.line, i.key) for i in issues]


GOOD = """
    name: orders
    description: orders into memory
    sources:
      shop:
        type: fake
        config:
          dsn: "${SHOP_DSN}"
          tables: [public.orders]
          batch_timeout: 20ms
        error_handling: {retry_count: 3, backoff: fixed, initial_backoff: 100ms}
    transformations:
      keep:
        type: pass
        inputs: [shop]
    destinations:
      out:
        type: memory
        inputs: [keep]
"""


# -- the acceptance criterion: several mistakes, all reported with their lines

THREE_MISTAKES = """
    name: broken
    sources:
      shop:
        type: fake
        config:
          dsn: postgres://x
          batch_sise: 100
    destinations:
      out:
        type: memory
        inputs: [shop, nowhere]
        config:
          url: memory://
      other:
        type: memroy
        inputs: [shop]
"""


def test_three_mistakes_all_reported_with_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yaml", THREE_MISTAKES)
    issues = issues_of(path)
    assert keyed(issues) == [
        (7, "sources.shop.config.batch_sise"),
        (11, "destinations.out.inputs[1]"),
        (15, "destinations.other.type"),
    ]
    assert "did you mean 'batch_size'" in issues[0].message
    assert "unknown input 'nowhere'" in issues[1].message
    assert "did you mean 'memory'" in issues[2].message
    assert "known types:" in issues[2].message and "memory" in issues[2].message
    assert all(i.file == path for i in issues)


def test_validate_main_prints_every_issue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "broken.yaml", THREE_MISTAKES)
    assert validate_main([path]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path}:7: sources.shop.config.batch_sise: unknown key")
    assert lines[1].startswith(f"{path}:11: destinations.out.inputs[1]: unknown input")
    assert lines[2].startswith(f"{path}:15: destinations.other.type: unknown destination type")
    assert lines[3] == "FAILED: 3 issue(s) in 1 file(s)"
    assert len(lines) == 4


def test_validate_main_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_DSN", "postgres://x")
    a = write(tmp_path, "a.yaml", GOOD)
    b = write(tmp_path, "b.yaml", GOOD.replace("name: orders", "name: orders-2"))
    assert validate_main([a, b]) == 0
    assert capsys.readouterr().out == "OK: 2 workflow(s)\n"


def test_validate_main_defaults_to_dataflare_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = write(tmp_path, "dataflare.yaml", "workflows_dir: missing.d\n")
    monkeypatch.setenv("DATAFLARE_CONFIG", daemon)
    assert default_config_path() == daemon
    assert validate_main([]) == 1
    assert f"{daemon}:1: workflows_dir: workflows directory" in capsys.readouterr().out


def test_default_config_path() -> None:
    assert default_config_path() == "/etc/dataflare/dataflare.yaml"


# -- a good workflow and typed conversion


def test_good_workflow_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "orders.yaml", GOOD)
    wf = load_workflow_file(path, env={"SHOP_DSN": "postgres://u:pw@db/shop"})
    assert (wf.name, wf.description, wf.file) == ("orders", "orders into memory", path)
    assert not wf.drop_slot_on_remove
    (shop,) = wf.sources
    assert (shop.name, shop.type, shop.inputs, shop.file, shop.line) == (
        "shop",
        "fake",
        (),
        path,
        4,
    )
    assert shop.config == FakeSourceConfig(
        dsn="postgres://u:pw@db/shop", tables=["public.orders"], batch_timeout=0.02
    )
    assert shop.error_handling == ErrorHandling(3, "fixed", 0.1, 30.0)
    (keep,) = wf.transformations
    assert keep.inputs == ("shop",) and keep.config == FakeTransformConfig()
    (out,) = wf.destinations
    assert (out.inputs, out.line, out.error_handling) == (("keep",), 16, ErrorHandling())


def test_name_defaults_to_file_stem_and_sources_feed_destinations(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "Shop Orders.yml",
        """
        sources:
          shop: {type: fake, config: {dsn: x}}
        destinations:
          out: {type: memory, inputs: [shop]}
        drop_slot_on_remove: true
        """,
    )
    wf = load_workflow_file(path, env={})
    assert wf.name == "Shop Orders" and wf.transformations == () and wf.drop_slot_on_remove
    assert wf.slot_name() == "dataflare_shop_orders"


def test_slot_name_replaces_everything_outside_a_z_0_9_underscore() -> None:
    wf = WorkflowConfig("Orders-Replica.v2 é", "", "f", (), (), ())
    assert wf.slot_name() == "dataflare_orders_replica_v2__"


def source_config(tmp_path: Path, config: str, env: dict[str, str] | None = None) -> Any:
    """Load a one-source workflow whose source config is ``config`` (YAML lines)."""
    body = textwrap.indent(textwrap.dedent(config).strip("\n"), " " * 6)
    text = f"sources:\n  s:\n    type: fake\n    config:\n{body}\n"
    text += "destinations:\n  d: {type: memory, inputs: [s]}\n"
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    return load_workflow_file(str(path), env=env or {}).sources[0].config


def source_issues(tmp_path: Path, config: str, env: dict[str, str] | None = None) -> list[str]:
    """Issues ("line key: message") of a one-source workflow; config starts at line 5."""
    with pytest.raises(ConfigInvalid) as info:
        source_config(tmp_path, config, env)
    return [f"{i.line} {i.key}: {i.message}" for i in info.value.issues]


def test_typed_conversion(tmp_path: Path) -> None:
    cfg = source_config(
        tmp_path,
        """
        dsn: x
        tables: [a, b]
        snapshot: never
        batch_size: 10
        batch_timeout: 1.5s
        ring_size: 1GB
        ratio: 2
        enabled: false
        headers: {X-Api: v}
        auth: {user: u}
        heartbeat: 2m
        """,
    )
    assert cfg == FakeSourceConfig(
        dsn="x",
        tables=["a", "b"],
        snapshot="never",
        batch_size=10,
        batch_timeout=1.5,
        ring_size=1_000_000_000,
        ratio=2.0,
        enabled=False,
        headers={"X-Api": "v"},
        auth=Auth("u"),
        heartbeat=120.0,
    )
    assert isinstance(cfg.ratio, float)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("3", 3.0),
        ("0.25", 0.25),
        ("1h30m", 5400.0),
        ("500us", 0.0005),
    ],
)
def test_durations(tmp_path: Path, text: str, seconds: float) -> None:
    cfg = source_config(tmp_path, f"dsn: x\nbatch_timeout: {text}")
    assert cfg.batch_timeout == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 * 2**20),
        ("1GB", 10**9),
        ("512 KB", 512_000),
        ("4096", 4096),
        ("1.5KiB", 1536),
        ("1.1MB", 1_100_000),
        ("10b", 10),
    ],
)
def test_byte_sizes(tmp_path: Path, text: str, size: int) -> None:
    assert source_config(tmp_path, f"dsn: x\nring_size: {text}").ring_size == size


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("batch_size: '5000'", "6 sources.s.config.batch_size: expected an integer, got a string"),
        ("batch_size: true", "6 sources.s.config.batch_size: expected an integer, got true/false"),
        ("batch_size: 1.5", "6 sources.s.config.batch_size: expected an integer, got a number"),
        ("batch_size:", "6 sources.s.config.batch_size: has no value (expected an integer)"),
        ("enabled: 1", "6 sources.s.config.enabled: expected true or false, got an integer"),
        ("ratio: fast", "6 sources.s.config.ratio: expected a number, got a string"),
        (
            "snapshot: sometimes",
            "6 sources.s.config.snapshot: must be one of: initial, never (got 'sometimes')",
        ),
        ("batch_timeout: soon", "6 sources.s.config.batch_timeout: expected a duration"),
        ("batch_timeout: -1", "6 sources.s.config.batch_timeout: expected a duration"),
        ("ring_size: lots", "6 sources.s.config.ring_size: expected a size"),
        ("ring_size: 1.5B", "6 sources.s.config.ring_size: expected a size"),
        ("tables: public.orders", "6 sources.s.config.tables: expected a list, got a string"),
        ("tables: [a, 3]", "6 sources.s.config.tables[1]: expected a string, got an integer"),
        ("headers: {a: 1}", "6 sources.s.config.headers.a: expected a string, got an integer"),
        ("headers: [a]", "6 sources.s.config.headers: expected a mapping, got a list"),
        (
            "auth: {user: u, pasword: x}",
            "6 sources.s.config.auth.pasword: unknown key (did you mean 'password'?)",
        ),
        ("auth: {}", "6 sources.s.config.auth.user: required key is missing"),
        ("batchsize: 5", "6 sources.s.config.batchsize: unknown key (did you mean 'batch_size'?)"),
        ("zzz: 5", "6 sources.s.config.zzz: unknown key; known keys: auth, batch_size"),
    ],
)
def test_wrong_values(tmp_path: Path, line: str, expected: str) -> None:
    (issue,) = source_issues(tmp_path, f"dsn: x\n{line}")
    assert issue.startswith(expected)


def test_missing_required_key_points_at_config(tmp_path: Path) -> None:
    assert source_issues(tmp_path, "batch_size: 5") == [
        "4 sources.s.config.dsn: required key is missing"
    ]


def test_value_lines_in_block_lists(tmp_path: Path) -> None:
    issues = source_issues(tmp_path, "dsn: x\ntables:\n  - a\n  - [b]\n")
    assert issues == ["8 sources.s.config.tables[1]: expected a string, got a list"]


# -- environment expansion


def test_env_expansion(tmp_path: Path) -> None:
    cfg = source_config(
        tmp_path,
        """
        dsn: "host=${HOST} port=${PORT:-5432} user=${EMPTY:-dflt} pw=$$ecret"
        tables: ["${SCHEMA}.orders"]
        batch_size: ${BATCH}
        enabled: ${ENABLED:-off}
        batch_timeout: ${TIMEOUT:-250ms}
        headers: {X-Cost: "$$5 and $HOME"}
        """,
        env={"HOST": "db", "SCHEMA": "public", "BATCH": "100", "EMPTY": "", "HOME": "/root"},
    )
    assert cfg.dsn == "host=db port=5432 user=dflt pw=$ecret"
    assert cfg.tables == ["public.orders"]
    assert cfg.batch_size == 100 and cfg.enabled is False
    assert cfg.batch_timeout == 0.25
    assert cfg.headers == {"X-Cost": "$5 and $HOME"}  # only ${...} expands


def test_env_set_but_empty_without_default_is_empty(tmp_path: Path) -> None:
    cfg = source_config(tmp_path, 'dsn: "a${EMPTY}b"', env={"EMPTY": ""})
    assert cfg.dsn == "ab"


def test_unset_variable_is_named_and_nothing_else_shown(tmp_path: Path) -> None:
    env = {"SHOP_PW": "hunter2-secret"}
    issues = source_issues(tmp_path, 'dsn: "user=a password=${SHOP_PW} host=${SHOP_HOST}"', env)
    assert len(issues) == 1
    assert issues[0].startswith("5 sources.s.config.dsn: environment variable SHOP_HOST is not set")
    assert "hunter2" not in issues[0] and "user=a" not in issues[0]


def test_env_value_of_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    (issue,) = source_issues(tmp_path, "dsn: x\nbatch_size: ${BATCH}", {"BATCH": "many-secret"})
    assert "expected an integer" in issue and "many-secret" not in issue


def test_bad_reference_syntax(tmp_path: Path) -> None:
    (issue,) = source_issues(tmp_path, 'dsn: "${1BAD}"')
    assert "invalid ${...} reference" in issue


def test_env_in_daemon_settings(tmp_path: Path) -> None:
    (tmp_path / "wf.d").mkdir()
    daemon = write(
        tmp_path,
        "dataflare.yaml",
        """
        daemon:
          socket: ${RUNTIME_DIRECTORY:-/run/dataflare}/df.sock
          log_level: ${LEVEL}
        workflows_dir: ${WF_DIR}
        """,
    )
    config, issues = load_daemon_config(daemon, env={"LEVEL": "debug", "WF_DIR": "wf.d"})
    assert issues == []
    assert config.daemon.socket == "/run/dataflare/df.sock"
    assert config.daemon.log_level == "DEBUG"
    assert config.workflows_dir == str(tmp_path / "wf.d")


# -- *_file secrets and secrecy


def test_file_secrets(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("postgres://u:pw@db/x\n\n")  # only one newline goes
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "pw").write_text("pa$$word")
    cfg = source_config(
        tmp_path,
        """
        dsn_file: dsn
        token_file: ${CREDENTIALS_DIRECTORY}/token
        auth: {user: u, password_file: creds/pw}
        """,
        env={"CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    assert cfg.dsn == "postgres://u:pw@db/x\n"
    assert cfg.token == "tok"
    assert cfg.auth == Auth("u", "pa$$word")  # file contents are never expanded


def test_file_secret_problems(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("p\n")
    issues = source_issues(
        tmp_path,
        """
        dsn_file: /nonexistent/dsn
        token: a
        token_file: pw
        auth: {user: u, password: x, password_file: pw}
        """,
    )
    assert issues == [
        "5 sources.s.config.dsn_file: cannot read /nonexistent/dsn: No such file or directory",
        "7 sources.s.config.token_file: give either token or token_file, not both",
        "8 sources.s.config.auth.password_file: give either password or password_file, not both",
    ]


def test_file_variant_only_for_secret_keys(tmp_path: Path) -> None:
    (issue,) = source_issues(tmp_path, "dsn: x\nratio_file: /etc/hostname")
    assert "ratio_file: unknown key" in issue


def test_secrets_not_in_repr_or_messages(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """
        sources:
          s: {type: fake, config: {dsn: "postgres://u:hunter2@db", token: tok-hunter2}}
        destinations:
          d:
            type: memory
            inputs: [s]
            config: {password: 12345678}
        """,
    )
    issues = issues_of(path)
    assert keyed(issues) == [(7, "destinations.d.config.password")]
    assert "12345678" not in str(issues[0]) and "quote" not in issues[0].message

    path = write(
        tmp_path, "wf.yaml", (tmp_path / "wf.yaml").read_text().replace("12345678", "'pw-hunter2'")
    )
    wf = load_workflow_file(path, env={})
    assert "hunter2" not in repr(wf)
    assert wf.sources[0].config.dsn == "postgres://u:hunter2@db"
    assert isinstance(wf.destinations[0].config.password, SecretStr)
    copy = pickle.loads(pickle.dumps(wf))
    assert copy == wf and "hunter2" not in repr(copy)


def test_secret_literal_choice_not_echoed(tmp_path: Path) -> None:
    (issue,) = source_issues(tmp_path, "dsn: [hunter2]")
    assert issue == "5 sources.s.config.dsn: expected a string, got a list"


def test_syntax_error_does_not_quote_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "wf.yaml", 'sources:\n  s: {dsn: "hunter2\n')
    (issue,) = issues_of(path)
    assert issue.line == 3 and "hunter2" not in str(issue)
    assert "quoted scalar (started at line 2)" in issue.message


# -- the DAG


def test_dag_mistakes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """
        sources:
          a: {type: fake, config: {dsn: x}, inputs: [b]}
          b: {type: kafka, config: {dsn: x}}
        transformations:
          t1: {type: pass, inputs: [t2]}
          t2: {type: pass, inputs: [t1, a]}
          t3: {type: pass}
          t4: {type: nope, inputs: [a]}
        destinations:
          d1: {type: memory, inputs: [t2, d2]}
          d2: {type: memory, inputs: []}
          a: {type: memory, inputs: [t4]}
        """,
    )
    issues = issues_of(path)
    assert [str(i).removeprefix(f"{path}:") for i in issues] == [
        "2: sources.a.inputs: a source takes no inputs",
        "3: sources.b.type: unknown source type 'kafka'; known types: "
        + ", ".join(sorted(SOURCE_TYPES)),
        "5: transformations.t1.inputs: inputs form a cycle: t1 -> t2 -> t1",
        "7: transformations.t3.inputs: a transformation needs inputs: "
        "a list of source or transformation names",
        "8: transformations.t4.type: unknown transformation type 'nope'; known types: "
        "filter, lookup, mapping, mask, pass, rename, route",
        "10: destinations.d1.inputs[1]: 'd2' is a destination; destinations have no output",
        "11: destinations.d2.inputs: a destination needs inputs: "
        "a list of source or transformation names",
        "12: destinations.a: node name 'a' is already used by sources.a (line 2); "
        "names must be unique",
    ]


def test_unused_source_and_transformation(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """
        sources:
          a: {type: fake, config: {dsn: x}}
          b: {type: fake, config: {dsn: x}}
        transformations:
          t: {type: pass, inputs: [a]}
          u: {type: pass, inputs: [a]}
        destinations:
          d: {type: memory, inputs: [t]}
        """,
    )
    assert [(i.line, i.key, i.message.split(":")[0]) for i in issues_of(path)] == [
        (3, "sources.b", "source is not used"),
        (6, "transformations.u", "transformation is not used"),
    ]


def test_unknown_input_is_not_also_reported_as_unused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """
        sources:
          shop: {type: fake, config: {dsn: x}}
        destinations:
          d: {type: memory, inputs: [shpo]}
        """,
    )
    (issue,) = issues_of(path)
    assert (issue.line, issue.message) == (4, "unknown input 'shpo' (did you mean 'shop'?)")


def test_transformation_config_errors_name_their_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """
        sources: {s: {type: fake, config: {dsn: x}}}
        transformations:
          f: {type: filter, inputs: [s], config: {tables: [a.b]}}
          m:
            type: mask
            inputs: [f]
            config:
              rules: [{field: email, method: hash}]
          r:
            type: route
            inputs: [m]
            config:
              routes: [{tables: [a.b], to: [d1, d9]}]
        destinations:
          d1: {type: memory, inputs: [r]}
          d2: {type: memory, inputs: [r]}
        """,
    )
    assert [(i.key, i.message) for i in issues_of(path)] == [
        ("transformations.f.config.condition", "required key is missing"),
        (
            "transformations.m.config.rules[0].method",
            "the hash method needs a secret key: set `salt` or `salt_file`",
        ),
        ("transformations.r.config.routes[0].to[1]", "'d9' does not list 'r' in its `inputs`"),
        (
            "transformations.r.config.routes",
            "'d2' takes this route as input but no route or `default` sends to it",
        ),
    ]


# -- file-level problems


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "wf.yaml", "sources:\n  s: [a, b\ndestinations: {}\n")
    (issue,) = issues_of(path)
    assert issue.line == 3 and "column 13" in issue.message and issue.key == ""
    assert str(issue).startswith(f"{path}:3: YAML syntax error")


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "the file is empty"), ("- a\n- b\n", "the top level is not a mapping")],
)
def test_non_mapping_top_level(tmp_path: Path, text: str, message: str) -> None:
    (issue,) = issues_of(write(tmp_path, "wf.yaml", text))
    assert message in issue.message and issue.line == 1


def test_top_level_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """
        name: x
        sources: {s: {type: fake, config: {dsn: x}}}
        destination: {d: {type: memory, inputs: [s]}}
        name: y
        """,
    )
    assert [(i.line, i.key, i.message) for i in issues_of(path)] == [
        (1, "destinations", "at least one destination is required"),
        (3, "destination", "unknown key (did you mean 'destinations'?)"),
        (4, "name", "duplicate key (first at line 1)"),
    ]


def test_missing_file(tmp_path: Path) -> None:
    (issue,) = issues_of(str(tmp_path / "nope.yaml"))
    assert (issue.line, issue.message) == (1, "cannot read file: No such file or directory")


def test_anchors_and_merge_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """
        sources:
          s:
            type: fake
            config: &base {dsn: x, batch_size: 5}
          t:
            type: fake
            config:
              <<: *base
              batch_size: 7
              ratio: nope
        destinations: {d: {type: memory, inputs: [s, t]}}
        """,
    )
    (issue,) = issues_of(path)
    assert (issue.line, issue.key) == (10, "sources.t.config.ratio")
    path = write(tmp_path, "wf.yaml", (tmp_path / "wf.yaml").read_text().replace("nope", "2"))
    wf = load_workflow_file(path, env={})
    assert [s.config.batch_size for s in wf.sources] == [5, 7]


def test_error_handling(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """
        sources:
          s:
            type: fake
            config: {dsn: x}
            error_handling: {retry_count: -1, backoff: linear, initial_backoff: 2s}
          t:
            type: fake
            config: {dsn: x}
            error_handling:
              initial_backoff: 2s
              max_backoff: 1s
              retries: 3
        destinations: {d: {type: memory, inputs: [s, t]}}
        """,
    )
    assert [(i.line, i.key) for i in issues_of(path)] == [
        (5, "sources.s.error_handling.backoff"),
        (5, "sources.s.error_handling.retry_count"),
        (11, "sources.t.error_handling.max_backoff"),
        (12, "sources.t.error_handling.retries"),
    ]


def test_issue_str_and_config_invalid() -> None:
    a = ConfigIssue("w.yaml", 3, "sources.s.type", "bad")
    b = ConfigIssue("w.yaml", 1, "", "empty")
    assert str(a) == "w.yaml:3: sources.s.type: bad" and str(b) == "w.yaml:1: empty"
    err = ConfigInvalid([a, b])
    assert "w.yaml:3: sources.s.type: bad" in str(err) and "w.yaml:1: empty" in str(err)
    assert pickle.loads(pickle.dumps(err)).issues == [a, b]


def test_fingerprint(tmp_path: Path) -> None:
    env = {"SHOP_DSN": "x"}
    base = load_workflow_file(write(tmp_path, "a/orders.yaml", GOOD), env).fingerprint()
    moved = GOOD.replace("description: orders into memory", "# moved\n    description: other")
    assert load_workflow_file(write(tmp_path, "b/o.yaml", moved), env).fingerprint() == base
    changed = GOOD.replace("20ms", "30ms")
    assert load_workflow_file(write(tmp_path, "c/o.yaml", changed), env).fingerprint() != base
    assert (
        load_workflow_file(write(tmp_path, "d/o.yaml", GOOD), {"SHOP_DSN": "y"}).fingerprint()
        != base
    )
    assert len(base) == 64


# -- the daemon file


def test_daemon_file_with_good_and_bad_workflows(tmp_path: Path) -> None:
    daemon = write(
        tmp_path,
        "etc/dataflare.yaml",
        """
        daemon:
          state_dir: state
          log_format: text
          metrics_listen: 127.0.0.1:9187
        """,
    )
    good = write(tmp_path, "etc/workflows.d/10-good.yaml", GOOD)
    bad = write(tmp_path, "etc/workflows.d/20-bad.yml", THREE_MISTAKES)
    dup = write(tmp_path, "etc/workflows.d/30-dup.yaml", GOOD)
    for ignored in (".#10-good.yaml", "10-good.yaml~", ".10-good.yaml.swp", "notes.txt"):
        write(tmp_path, f"etc/workflows.d/{ignored}", "garbage: [")
    (tmp_path / "etc/workflows.d/dir.yaml").mkdir()

    config, issues = load_daemon_config(daemon, env={"SHOP_DSN": "x"})
    assert config.path == daemon
    assert config.workflows_dir == str(tmp_path / "etc/workflows.d")
    assert config.daemon == DaemonSettings(
        state_dir=str(tmp_path / "etc/state"),
        log_format="text",
        metrics_listen="127.0.0.1:9187",
    )
    assert [w.name for w in config.workflows] == ["orders"]
    assert config.workflows[0].file == good
    assert [(i.file, i.line, i.key) for i in issues] == [
        (bad, 7, "sources.shop.config.batch_sise"),
        (bad, 11, "destinations.out.inputs[1]"),
        (bad, 15, "destinations.other.type"),
        (dup, 1, "name"),
    ]
    assert issues[-1].message == f"workflow name 'orders' is already used by {good}"
    # validate sees the same, daemon file detected by its keys
    assert validate_paths([daemon], env={"SHOP_DSN": "x"}) == issues


def test_daemon_file_defaults(tmp_path: Path) -> None:
    (tmp_path / "workflows.d").mkdir()
    daemon = write(tmp_path, "dataflare.yaml", "daemon: {}\n")
    config, issues = load_daemon_config(daemon, env={})
    assert issues == [] and config.workflows == ()
    assert config.daemon == DaemonSettings()
    assert config.workflows_dir == str(tmp_path / "workflows.d")


def test_daemon_file_errors_raise(tmp_path: Path) -> None:
    daemon = write(
        tmp_path,
        "dataflare.yaml",
        """
        daemon:
          log_level: loud
          log_format: xml
          metrics_listen: localhost
          sokcet: /x
        workflows_dir: missing.d
        """,
    )
    with pytest.raises(ConfigInvalid) as info:
        load_daemon_config(daemon, env={})
    assert [(i.line, i.key) for i in info.value.issues] == [
        (2, "daemon.log_level"),
        (3, "daemon.log_format"),
        (4, "daemon.metrics_listen"),
        (5, "daemon.sokcet"),
        (6, "workflows_dir"),
    ]
    assert "json, text" in info.value.issues[1].message
    assert "did you mean 'socket'" in info.value.issues[3].message
    assert "does not exist" in info.value.issues[4].message


def test_validate_paths_counts_each_file_once(tmp_path: Path) -> None:
    daemon = write(tmp_path, "dataflare.yaml", "workflows_dir: .\n")
    wf = write(tmp_path, "broken.yaml", THREE_MISTAKES)
    assert len(validate_paths([daemon, wf], env={})) == 3
    assert len(validate_paths([wf, daemon], env={})) == 3


def test_shipped_examples_validate() -> None:
    assert validate_paths([str(REPO / "etc" / "dataflare.yaml")], env={}) == []
    config, issues = load_daemon_config(str(REPO / "etc" / "dataflare.yaml"), env={})
    assert issues == [] and [w.name for w in config.workflows] == ["demo-generate"]
    (dest,) = config.workflows[0].destinations
    assert dest.type == "file" and dest.inputs == ("gen",)


def test_located_yaml_lines() -> None:
    doc, problems = load_located("a:\n  b: [1,\n    2]\n  c:\n    - x\n")
    assert problems == [] and doc is not None
    assert doc.data == {"a": {"b": [1, 2], "c": ["x"]}}
    assert doc.line(("a", "b", 1)) == 3 and doc.line(("a", "c", 0)) == 5
    assert doc.line(("a", "c", "missing")) == 4 and doc.line(()) == 1


def test_one_source_twice_into_a_node_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """
        sources:
          s: {type: fake, config: {dsn: x}}
          t: {type: fake, config: {dsn: y}}
        transformations:
          a: {type: pass, inputs: [s]}
          b: {type: pass, inputs: [s]}
        destinations:
          both: {type: memory, inputs: [a, b]}
          fine: {type: memory, inputs: [a, t]}
        """,
    )
    assert [(i.key, i.message) for i in issues_of(path)] == [
        (
            "destinations.both.inputs[1]",
            "'both' would receive the changes of source 's' twice (through 'a' and 'b'); "
            "give each path its own destination",
        )
    ]
