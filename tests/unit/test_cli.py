"""The CLI without a daemon: rendering, plan, check, exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from dataflare.cdc.registry import SOURCE_TYPES, ConnectorType
from dataflare.daemon import cli

from tests.tui.sample_status import snapshot


def write_workflow(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_render_status_table() -> None:
    text = cli.render_status(snapshot(5))
    lines = text.splitlines()
    assert lines[0] == "dataflare 0.1.0  up 1h00m  config generation 3"
    header = next(ln for ln in lines if ln.startswith("WORKFLOW"))
    assert header.split() == [
        "WORKFLOW",
        "STATE",
        "IN/s",
        "OUT/s",
        "LAG",
        "RING",
        "ERR",
        "IN",
        "OUT",
    ]
    row = next(ln for ln in lines if ln.startswith("legacy-import"))
    assert "retrying" in row
    assert "retrying: source:legacy: connection refused" in text
    assert "snapshot 61500/250000 rows (25%)" in text
    assert max(len(ln) for ln in lines if not ln.startswith("  ")) <= 100


def test_render_status_config_errors_and_no_workflows() -> None:
    st = {
        "daemon": {
            "version": "0.1.0",
            "uptime_s": 5,
            "config_generation": 2,
            "config_errors": [
                {"file": "/etc/x.yaml", "line": 4, "key": "sources.a.type", "message": "bad"}
            ],
        },
        "workflows": [],
    }
    text = cli.render_status(st)
    assert "1 config error(s)" in text
    assert "config error: /etc/x.yaml:4: sources.a.type: bad" in text
    assert "(no workflows)" in text


def test_render_workflow_detail_has_tables_errors_and_log() -> None:
    w = snapshot(1)["workflows"][2]
    text = cli.render_workflow_detail(w)
    assert "public.orders" in text and "INSERT" in text
    assert "recent errors:" in text and "connection refused" in text
    assert "log:" in text and "apply streaming" in text


def _dag_workflow(tmp_path: Path) -> Path:
    return write_workflow(
        tmp_path / "wf.yaml",
        {
            "name": "fanout",
            "description": "two sources, two destinations",
            "sources": {
                "gen": {"type": "generate", "config": {"tables": ["public.a"]}},
                "gen2": {"type": "generate"},
            },
            "destinations": {
                "files": {
                    "type": "file",
                    "inputs": ["gen", "gen2"],
                    "config": {"path": str(tmp_path / "out" / "a.jsonl")},
                },
                "screen": {"type": "stdout", "inputs": ["gen"]},
            },
        },
    )


def test_plan_draws_a_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wf = _dag_workflow(tmp_path)
    assert cli.main(["plan", str(wf)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "workflow fanout: two sources, two destinations"
    assert (
        "gen [generate source]  tables: public.a\n"
        "├─▶ files [file destination]  (from gen, gen2)\n"
        "└─▶ screen [stdout destination]\n"
        "\n"
        "gen2 [generate source]  tables: public.items\n"
        "└─▶ files [file destination]  (from gen, gen2)\n"
    ) in out
    assert "2 source(s), 0 transformation(s), 2 destination(s)" in out


def test_plan_unknown_workflow_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "dataflare.yaml"
    (tmp_path / "workflows.d").mkdir()
    cfg.write_text(yaml.safe_dump({"daemon": {}, "workflows_dir": "workflows.d"}))
    assert cli.main(["--config", str(cfg), "plan", "nope"]) == 1
    assert "no workflow named 'nope'" in capsys.readouterr().err


def test_check_file_destination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wf = _dag_workflow(tmp_path)
    # the output directory does not exist yet: a failed check, exit 1
    assert cli.main(["check", str(wf)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  directory" in out and "does not exist" in out
    assert out.count("OK    synthetic source") == 2
    assert "1 check(s) failed" in out
    (tmp_path / "out").mkdir()
    assert cli.main(["check", str(wf)]) == 0
    out = capsys.readouterr().out
    assert "is writable" in out and "all checks passed" in out


class FakeSource:
    """A source class with its own check (what the Postgres/MySQL sources provide)."""

    @classmethod
    def check(cls, name: str, config: Any) -> list[tuple[bool, str]]:
        return [
            (True, f"{name}: connected to {config['dsn']}"),
            (False, "wal_level is replica: set wal_level = logical"),
        ]


class BrokenSource:
    @staticmethod
    def check(name: str, config: Any) -> list[tuple[bool, str]]:
        raise ConnectionError("connection refused")


def test_check_node_uses_the_implementations_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SOURCE_TYPES, "fake", ConnectorType(dict, "tests.unit.test_cli:FakeSource"))
    monkeypatch.setitem(
        SOURCE_TYPES, "broken", ConnectorType(dict, "tests.unit.test_cli:BrokenSource")
    )
    monkeypatch.setitem(SOURCE_TYPES, "absent", ConnectorType(dict, "no.such.module:Source"))
    node = SimpleNamespace(name="shop", type="fake", config={"dsn": "x"})
    assert cli.check_node("source", node) == [
        (True, "shop: connected to x"),
        (False, "wal_level is replica: set wal_level = logical"),
    ]
    broken = cli.check_node("source", SimpleNamespace(name="b", type="broken", config={}))
    assert broken == [(False, "check failed: ConnectionError: connection refused")]
    absent = cli.check_node("source", SimpleNamespace(name="c", type="absent", config={}))
    assert not absent[0][0] and "cannot load no.such.module:Source" in absent[0][1]
    unknown = cli.check_node("source", SimpleNamespace(name="d", type="nope", config={}))
    assert unknown == [(False, "unknown source type 'nope'")]


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["pause"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2


def test_remote_commands_without_daemon_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(tmp_path / "none.sock")
    for args in (["status"], ["status", "--json"], ["pause", "x"], ["reload"]):
        assert cli.main(["--socket", sock, *args]) == 3
        assert "daemon not running" in capsys.readouterr().err


def test_status_json_is_the_daemons_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataflare.daemon import control_client

    snap = snapshot(0)

    class FakeClient:
        def __init__(self, path: str, timeout: float = 10.0) -> None:
            pass

        def __enter__(self) -> FakeClient:
            return self

        def __exit__(self, *a: object) -> None:
            pass

        def request(self, cmd: str, **args: Any) -> Any:
            assert cmd == "status"
            return snap

    monkeypatch.setattr(control_client, "ControlClient", FakeClient)
    assert cli.main(["--socket", "x", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == snap
    assert cli.main(["--socket", "x", "status", "orders-replica"]) == 0
    assert "public.orders" in capsys.readouterr().out
    assert cli.main(["--socket", "x", "status", "nope"]) == 1


class WorkflowAwareCheck:
    """A connector whose check needs the workflow name (e.g. a default slot name)."""

    @classmethod
    def check(
        cls, name: str, config: object, *, workflow: str | None = None
    ) -> list[tuple[bool, str]]:
        return [(workflow == "orders", f"{name} in {workflow}")]


def test_check_passes_the_workflow_name_to_connectors(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from dataflare.cdc.registry import SOURCE_TYPES, ConnectorType
    from dataflare.daemon import cli

    monkeypatch.setitem(
        SOURCE_TYPES, "aware", ConnectorType(object, "tests.unit.test_cli:WorkflowAwareCheck")
    )
    node = SimpleNamespace(name="shop", type="aware", config=None)
    wf = SimpleNamespace(name="orders", sources=[node], destinations=[])
    assert cli.run_checks(wf) == [("source", "shop (aware)", True, "shop in orders")]
