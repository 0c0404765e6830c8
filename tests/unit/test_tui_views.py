"""The dashboard's endpoint rows show transformations, refusals and open circuits."""

from __future__ import annotations

from dataflare.tui.views import endpoint_rows


def test_endpoint_rows_show_transformations_and_circuits() -> None:
    w = {
        "sources": [],
        "transformations": {"active": {"records_in": 10, "records_out": 7, "rejected": 1}},
        "destinations": [
            {
                "name": "mirror",
                "type": "postgres",
                "records_written": 7,
                "circuit": "open",
                "rejected": 2,
            },
            {"name": "log", "type": "file", "records_written": 7, "circuit": "closed"},
        ],
    }
    rows = endpoint_rows(w)
    assert rows[0][:2] == ["transform", "active"]
    assert rows[0][-1] == "10 in, 7 out, 1 refused"
    assert rows[1][-1] == "7 written, circuit open, 2 refused"
    assert rows[2][-1] == "7 written"
