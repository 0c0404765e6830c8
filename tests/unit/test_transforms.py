"""The row transformations (filter, mapping, mask, rename) on real changes."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Change, Column, Op, Position, Row, TableId, TableSchema
from dataflare.daemon.transforms.base import TransformContext
from dataflare.daemon.transforms.configs import (
    FieldMapping,
    FilterConfig,
    MappingConfig,
    MaskConfig,
    MaskRule,
    RenameConfig,
)
from dataflare.daemon.transforms.filter import FilterTransform
from dataflare.daemon.transforms.mapping import MappingTransform
from dataflare.daemon.transforms.mask import MaskTransform
from dataflare.daemon.transforms.rename import RenameTransform
from dataflare.daemon.transforms.tables import TableSelector, parse_table_id, split_identifier
from dataflare.daemon.transforms.values import CASTS, text_form

CTX = TransformContext("wf", "node")
USERS = TableId("public", "users")
SCHEMA = TableSchema(
    USERS,
    (
        Column("id", "bigint", False, 20),
        Column("name", "text", True, 25),
        Column("email", "text", True, 25),
        Column("status", "text", True, 25),
        Column("bio", "text", True, 25),
    ),
    ("id",),
    version=3,
)
KEYLESS = TableSchema(TableId("public", "events"), SCHEMA.columns, ())
_seq = iter(range(1, 1_000_000))


def ch(
    op: Op,
    after: Row | None = None,
    before: Row | None = None,
    unchanged: frozenset[str] = frozenset(),
    schema: TableSchema = SCHEMA,
) -> Change:
    row = after if after is not None else before
    key = tuple(row[i] for i in schema.key_indexes()) if row is not None and schema.key else None
    return Change(op, schema.table, Position("generate", next(_seq)), key, before, after,
                  unchanged, 7, 1_700_000_000_000_000)  # fmt: skip


ANN: Row = (1, "Ann", "ann@example.com", "active", "likes cats")
BOB: Row = (2, "Bob", "bob@example.com", "inactive", "long text")


def filt(condition: str, **kw: Any) -> FilterTransform:
    return FilterTransform("active_only", FilterConfig(condition=condition, **kw), CTX)


# ---------------------------------------------------------------- tables


def test_table_names_in_sql_syntax() -> None:
    assert [p.text for p in split_identifier('public."Order.Items"')] == ["public", "Order.Items"]
    assert [p.text for p in split_identifier("shop.`Line ``x`` Items`")] == [
        "shop",
        "Line `x` Items",
    ]
    sel = TableSelector(['public."Order Items"', "Shop.Orders", "audit.*", "customers"])
    assert TableId("public", "Order Items") in sel
    assert TableId("public", "order items") not in sel  # quoted: exact
    assert TableId("shop", "orders") in sel and TableId("SHOP", "Orders") in sel
    assert TableId("audit", "anything") in sel
    assert TableId("crm", "customers") in sel  # a bare name: any schema
    assert TableId("public", "orders") not in sel
    assert TableId("x", "y") in TableSelector(None)
    assert parse_table_id('crm."Customers"') == TableId("crm", "Customers")
    with pytest.raises(FatalError):
        split_identifier('public."unterminated')


# ---------------------------------------------------------------- filter


def test_filter_inserts_reads_and_deletes() -> None:
    plan = filt("status == 'active'").plan(SCHEMA)
    assert plan.schema == SCHEMA
    ins_a, ins_b = ch(Op.INSERT, ANN), ch(Op.INSERT, BOB)
    read_b = ch(Op.READ, BOB)
    dele = ch(Op.DELETE, before=(2, None, None, None, None))
    trunc = Change(Op.TRUNCATE, USERS, Position("generate", 99))
    assert plan.apply([ins_a, ins_b, read_b, dele, trunc]) == [ins_a, dele, trunc]


def test_filter_update_that_stops_matching_becomes_a_delete() -> None:
    plan = filt("status == 'active'").plan(SCHEMA)
    starts = ch(Op.UPDATE, ANN)  # maybe inactive before: the sink upserts it whole
    stops = ch(Op.UPDATE, BOB)  # default replica identity: no old row
    (a, d) = plan.apply([starts, stops])
    assert a is starts
    assert d.op == Op.DELETE and d.after is None and d.key == (2,)
    assert d.before == (2, None, None, None, None)
    assert (d.table, d.position, d.xid, d.commit_ts_us) == (
        stops.table,
        stops.position,
        stops.xid,
        stops.commit_ts_us,
    )
    # A primary-key update that stops matching deletes the OLD key.
    moved = ch(Op.UPDATE, (5, *BOB[1:]), before=(2, None, None, None, None))
    (d2,) = plan.apply([moved])
    assert d2.op == Op.DELETE and d2.key == (2,) and d2.before == (2, None, None, None, None)


def test_filter_keyless_table_deletes_the_whole_old_row() -> None:
    plan = filt("status == 'active'").plan(KEYLESS)
    old = (2, "Bob", "bob@example.com", "active", "x")
    (d,) = plan.apply([ch(Op.UPDATE, BOB, before=old, schema=KEYLESS)])
    assert d.op == Op.DELETE and d.before == old and d.key is None and d.after is None
    with pytest.raises(FatalError, match="REPLICA IDENTITY FULL"):
        plan.apply([ch(Op.UPDATE, BOB, schema=KEYLESS)])


def test_filter_reads_unchanged_toast_value_from_the_old_row() -> None:
    plan = filt("bio != 'secret'").plan(SCHEMA)
    sent = (1, "Ann", "a@x", "active", None)
    full_before = (1, "Ann", "old@x", "inactive", "likes cats")
    c = ch(Op.UPDATE, sent, before=full_before, unchanged=frozenset({"bio"}))
    (out,) = plan.apply([c])
    assert out.after == (1, "Ann", "a@x", "active", "likes cats") and out.unchanged == frozenset()
    with pytest.raises(FatalError, match="REPLICA IDENTITY FULL") as e:
        plan.apply([ch(Op.UPDATE, sent, unchanged=frozenset({"bio"}))])
    assert "likes" not in str(e.value)
    # A condition that does not read the unchanged column leaves the change alone.
    other = filt("status == 'active'").plan(SCHEMA)
    c2 = ch(Op.UPDATE, sent, unchanged=frozenset({"bio"}))
    assert other.apply([c2]) == [c2]


def test_filter_only_on_listed_tables() -> None:
    t = filt("status == 'active'", tables=["public.orders"])
    plan = t.plan(SCHEMA)
    c = ch(Op.INSERT, BOB)
    assert plan.apply([c]) == [c]
    with pytest.raises(FatalError, match=r"public\.users"):
        filt("nosuch == 1").plan(SCHEMA)


# ---------------------------------------------------------------- mapping


def mapping(*maps: FieldMapping, **kw: Any) -> MappingTransform:
    return MappingTransform("m", MappingConfig(mappings=list(maps), **kw), CTX)


def test_mapping_rename_drop_and_key_rename() -> None:
    t = mapping(
        FieldMapping(destination="user_id", source="id"),
        FieldMapping(destination="mail", source="email"),
        drop=["bio"],
    )
    plan = t.plan(SCHEMA)
    s = plan.schema
    assert s.column_names == ("user_id", "name", "mail", "status")
    assert s.key == ("user_id",) and s.table == USERS and s.version == SCHEMA.version
    assert s.columns[0] == Column("user_id", "bigint", False, 20)
    dele = ch(Op.DELETE, before=(1, None, None, None, None))
    upd = ch(Op.UPDATE, ANN, unchanged=frozenset({"email"}))
    a, b, d = plan.apply([ch(Op.INSERT, ANN), upd, dele])
    assert a.after == (1, "Ann", "ann@example.com", "active") and a.key == (1,)
    assert b.unchanged == {"mail"}
    assert d.before == (1, None, None, None) and d.after is None and d.key == (1,)


def test_mapping_keep() -> None:
    plan = mapping(FieldMapping(destination="who", source="name"), keep=["id", "status"]).plan(
        SCHEMA
    )
    assert plan.schema.column_names == ("id", "who", "status")
    (c,) = plan.apply([ch(Op.INSERT, ANN)])
    assert c.after == (1, "Ann", "active")


def test_mapping_config_errors_name_table_and_column() -> None:
    with pytest.raises(FatalError, match=r"public\.users.*nosuch"):
        mapping(FieldMapping(destination="x", source="nosuch")).plan(SCHEMA)
    with pytest.raises(FatalError, match=r"public\.users.*\bid\b"):
        mapping(drop=["id"]).plan(SCHEMA)
    with pytest.raises(FatalError, match=r"\bid\b"):
        mapping(keep=["name"]).plan(SCHEMA)
    with pytest.raises(FatalError, match="name"):  # nested into an existing column
        mapping(FieldMapping(destination="name.first", source="email")).plan(SCHEMA)
    # A table the mapping does not apply to is left alone, whatever it lacks.
    other = mapping(FieldMapping(destination="x", source="nosuch"), tables=["public.orders"])
    assert other.plan(SCHEMA).schema == SCHEMA


def test_mapping_nested_destinations_merge_into_one_jsonb_column() -> None:
    plan = mapping(
        FieldMapping(destination="user.firstName", source="name"),
        FieldMapping(destination="user.contact.email", source="email"),
        FieldMapping(destination="user.active", expression="status == 'active'"),
    ).plan(SCHEMA)
    assert plan.schema.column_names == ("id", "status", "bio", "user")
    assert plan.schema.columns[-1].type_name == "jsonb"
    (c,) = plan.apply([ch(Op.INSERT, ANN)])
    assert c.after == (
        1,
        "active",
        "likes cats",
        {"firstName": "Ann", "contact": {"email": "ann@example.com"}, "active": True},
    )


def test_mapping_cast_and_computed_columns() -> None:
    schema = TableSchema(
        TableId("shop", "orders"),
        (Column("id", "text"), Column("qty", "text"), Column("price", "numeric(10,2)")),
        ("id",),
    )
    plan = mapping(
        FieldMapping(destination="id", source="id", cast="integer"),
        FieldMapping(destination="qty", source="qty", cast="integer"),
        FieldMapping(destination="total", expression="price * 3"),
        FieldMapping(destination="total_text", expression="price", cast="text"),
    ).plan(schema)
    cols = {c.name: c.type_name for c in plan.schema.columns}
    assert cols == {"id": "integer", "qty": "integer", "price": "numeric(10,2)",
                    "total": "numeric", "total_text": "text"}  # fmt: skip
    ins = Change(Op.INSERT, schema.table, Position("g", 1), ("7",), None,
                 ("7", " 3 ", Decimal("2.50")))  # fmt: skip
    dele = Change(Op.DELETE, schema.table, Position("g", 2), ("8",), ("8", None, None), None)
    a, d = plan.apply([ins, dele])
    assert a.key == (7,) and a.after[:3] == (7, 3, Decimal("2.50"))
    assert a.after[3] == Decimal("7.50") and a.after[4] == "2.50"
    assert d.key == (8,) and d.before == (8, None, None, None, None)
    bad = Change(Op.INSERT, schema.table, Position("g", 3), ("9",), None, ("9", "lots", None))
    with pytest.raises(FatalError, match=r"qty.*integer") as e:
        plan.apply([bad])
    assert "lots" not in str(e.value)


def test_mapping_computed_from_unchanged_toast_column() -> None:
    plan = mapping(
        FieldMapping(destination="bio_upper", expression="upper(bio)"),
        FieldMapping(destination="label", expression="name + ':' + bio"),
    ).plan(SCHEMA)
    sent = (1, "Ann", "a@x", "active", None)
    with pytest.raises(FatalError, match="REPLICA IDENTITY FULL"):
        plan.apply([ch(Op.UPDATE, sent, unchanged=frozenset({"bio"}))])
    full = (1, "Ann", "a@x", "active", "cats")
    (c,) = plan.apply([ch(Op.UPDATE, sent, before=full, unchanged=frozenset({"bio"}))])
    assert c.unchanged == frozenset() and c.after[-2:] == ("CATS", "Ann:cats")
    only = mapping(FieldMapping(destination="bio_upper", expression="upper(bio)")).plan(SCHEMA)
    (c2,) = only.apply([ch(Op.UPDATE, sent, unchanged=frozenset({"bio"}))])
    assert c2.unchanged == {"bio", "bio_upper"}


def test_mapping_keyless_delete_computes_the_old_row() -> None:
    plan = mapping(FieldMapping(destination="n", expression="upper(name)")).plan(KEYLESS)
    (d,) = plan.apply([ch(Op.DELETE, before=BOB, schema=KEYLESS)])
    assert d.before == (*BOB, "BOB")
    keyed = mapping(FieldMapping(destination="n", expression="upper(name)")).plan(SCHEMA)
    (d2,) = keyed.apply([ch(Op.DELETE, before=BOB)])
    assert d2.before == (*BOB, None)


def test_mapping_computed_key_column_keeps_deletes_findable() -> None:
    plan = mapping(FieldMapping(destination="id", expression="id * 10")).plan(SCHEMA)
    key_only: Row = (2, None, None, None, None)
    u, d = plan.apply([ch(Op.UPDATE, after=BOB), ch(Op.DELETE, before=key_only)])
    assert u.key == (20,) and d.key == (20,) and d.before is not None and d.before[0] == 20
    with pytest.raises(FatalError, match=r"key column id of public\.users is computed"):
        mapping(FieldMapping(destination="id", expression="length(name)")).plan(SCHEMA)


def test_casts() -> None:
    assert CASTS["integer"]("42") == 42 and CASTS["bigint"](Decimal("2.5")) == 3
    assert CASTS["boolean"]("yes") is True and CASTS["boolean"](0) is False
    assert CASTS["numeric"](0.1) == Decimal("0.1")
    assert CASTS["double precision"]("1.5") == 1.5
    assert CASTS["date"]("2024-02-29T10:00:00+00:00") == date(2024, 2, 29)
    assert CASTS["timestamptz"]("2024-01-01 10:00") == datetime(2024, 1, 1, 10, tzinfo=UTC)
    assert CASTS["timestamp"](datetime(2024, 1, 1, 10, tzinfo=UTC)) == datetime(2024, 1, 1, 10)
    assert CASTS["jsonb"]('{"a": 1}') == '{"a": 1}'
    assert CASTS["text"](True) == "true" and text_form(b"\x01") == "\\x01"
    for target, bad in [("integer", "x"), ("integer", 1 << 40), ("boolean", "maybe"),
                        ("jsonb", "not json"), ("date", "soon")]:  # fmt: skip
        with pytest.raises(FatalError, match=target):
            CASTS[target](bad)


# ---------------------------------------------------------------- mask


def mask(*rules: MaskRule, salt: str | None = "pepper") -> MaskTransform:
    return MaskTransform("m", MaskConfig(rules=list(rules), salt=salt), CTX)


def test_mask_methods() -> None:
    plan = mask(
        MaskRule("name", "full"),
        MaskRule("email", "partial", show_chars=3, replacement="…"),
        MaskRule("status", "null"),
        MaskRule("bio", "hash"),
    ).plan(SCHEMA)
    types = [(c.name, c.type_name, c.nullable) for c in plan.schema.columns]
    assert types == [("id", "bigint", False), ("name", "text", True), ("email", "text", True),
                     ("status", "text", True), ("bio", "text", True)]  # fmt: skip
    before = (1, "Ann", "ab", None, "likes cats")
    (c,) = plan.apply([ch(Op.UPDATE, ANN, before=before)])
    want = hmac.new(b"pepper", b"likes cats", hashlib.sha256).hexdigest()
    assert c.after == (1, "***", "ann…", None, want)
    assert c.before == (1, "***", "…", None, want)  # too short to show any of it
    (n,) = plan.apply([ch(Op.INSERT, (3, None, None, None, None))])
    assert n.after == (3, None, None, None, None)  # NULL stays NULL


def test_mask_key_columns() -> None:
    with pytest.raises(FatalError, match=r"\bid\b.*hash"):
        mask(MaskRule("id", "full")).plan(SCHEMA)
    plan = mask(MaskRule("id", "hash")).plan(SCHEMA)
    assert plan.schema.key == ("id",) and plan.schema.columns[0].type_name == "text"
    ins, dele = plan.apply([ch(Op.INSERT, ANN), ch(Op.DELETE, before=(1, None, None, None, None))])
    h = hmac.new(b"pepper", b"1", hashlib.sha256).hexdigest()
    assert ins.key == (h,) and ins.after[0] == h and dele.key == (h,) and dele.before[0] == h
    # A table without the masked column passes through.
    assert mask(MaskRule("ssn", "full")).plan(SCHEMA).apply([ins]) == [ins]


# ---------------------------------------------------------------- rename


def rename(**kw: Any) -> RenameTransform:
    return RenameTransform("r", RenameConfig(**kw), CTX)


def test_rename_tables() -> None:
    t = rename(tables={"public.users": 'crm."Customers"'}, schema="replica", prefix="src_",
               only=["public.*"])  # fmt: skip
    plan = t.plan(SCHEMA)
    assert plan.schema.table == TableId("crm", "Customers")
    assert plan.schema.columns == SCHEMA.columns and plan.schema.version == SCHEMA.version
    c = ch(Op.INSERT, ANN)
    (out,) = plan.apply([c])
    assert out.table == TableId("crm", "Customers") and out[2:] == c[2:]
    orders = TableSchema(TableId("public", "orders"), SCHEMA.columns, ("id",))
    assert t.plan(orders).schema.table == TableId("replica", "src_orders")
    other = TableSchema(TableId("shop", "orders"), SCHEMA.columns, ("id",))
    plan2 = t.plan(other)
    assert plan2.schema == other and plan2.apply([c]) == [c]


def test_rename_collision_is_an_error() -> None:
    t = rename(schema="all")
    t.plan(TableSchema(TableId("a", "t"), SCHEMA.columns, ("id",)))
    with pytest.raises(FatalError, match=r"a\.t.*b\.t"):
        t.plan(TableSchema(TableId("b", "t"), SCHEMA.columns, ("id",)))


def test_filter_on_a_nested_json_field() -> None:
    schema = TableSchema(TableId("public", "t"), (Column("id", "bigint"), Column("user", "jsonb")),
                         ("id",))  # fmt: skip
    plan = filt("user.email != null").plan(schema)
    with_mail = Change(Op.INSERT, schema.table, Position("g", 1), (1,), None, (1, {"email": "x"}))
    without = Change(Op.INSERT, schema.table, Position("g", 2), (2,), None, (2, {"name": "y"}))
    assert plan.apply([with_mail, without]) == [with_mail]
