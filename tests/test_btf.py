"""The BTF parser on synthetic blobs built with encode_btf (every kind, paths, errors)."""

from __future__ import annotations

import struct

import pytest

from testbed.snapshot.btf import Btf, BtfError, Kind, Member, Type, encode_btf, subset

# ids:      1 int   2 u32   3 ptr   4 array 5 struct 6 union 7 enum  8 fwd
#           9 const 10 volatile 11 func_proto 12 func 13 var 14 datasec 15 float
#           16 enum64 17 struct outer 18 typedef task 19 decl_tag 20 type_tag 21 restrict
TYPES = [
    Type(0, Kind.INT, "int", size=4, int_bits=32, int_encoding=1),
    Type(0, Kind.TYPEDEF, "u32", ref=22),
    Type(0, Kind.PTR, "", ref=17),
    Type(0, Kind.ARRAY, "", ref=23, nelems=16),
    Type(0, Kind.STRUCT, "inner", size=24, members=(
        Member("pkru", 2, 0), Member("flag", 22, 32, 3), Member("flag2", 22, 35, 5),
        Member("arr", 4, 64))),
    Type(0, Kind.UNION, "", size=8, members=(Member("a", 1, 0), Member("b", 3, 0))),
    Type(0, Kind.ENUM, "color", size=4, kind_flag=True,
         enumerators=(("RED", 0), ("NEG", -1))),
    Type(0, Kind.FWD, "later"),
    Type(0, Kind.CONST, "", ref=1),
    Type(0, Kind.VOLATILE, "", ref=9),
    Type(0, Kind.FUNC_PROTO, "", ref=1, params=(("x", 1), ("p", 3))),
    Type(0, Kind.FUNC, "do_it", ref=11, linkage=1),
    Type(0, Kind.VAR, "my_percpu", ref=5, linkage=1),
    Type(0, Kind.DATASEC, ".data..percpu", size=64, vars=((13, 32, 16),)),
    Type(0, Kind.FLOAT, "double", size=8),
    Type(0, Kind.ENUM64, "big", size=8, kind_flag=False, enumerators=(("HUGE", 1 << 40),)),
    Type(0, Kind.STRUCT, "outer", size=48, members=(
        Member("head", 10, 0), Member("thread", 5, 64), Member("", 6, 256),
        Member("ctxs", 25, 320))),
    Type(0, Kind.TYPEDEF, "outer_t", ref=17),
    Type(0, Kind.DECL_TAG, "tag", ref=17),
    Type(0, Kind.TYPE_TAG, "user", ref=1),
    Type(0, Kind.RESTRICT, "", ref=3),
    Type(0, Kind.INT, "unsigned int", size=4, int_bits=32),
    Type(0, Kind.INT, "char", size=1, int_bits=8, int_encoding=2),
    Type(0, Kind.ARRAY, "", ref=22, nelems=2),
    Type(0, Kind.ARRAY, "", ref=26, nelems=2),
    Type(0, Kind.STRUCT, "ctx", size=4, members=(Member("gen", 22, 0),)),
]


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf.parse(encode_btf(TYPES))


def test_every_kind_round_trips(btf: Btf) -> None:
    assert btf.count == len(TYPES)
    for i, want in enumerate(TYPES, 1):
        got = btf.type(i)
        assert got.kind == want.kind and got.name == want.name, i
    assert btf.type(1).signed and btf.type(1).int_bits == 32
    assert btf.type(4).nelems == 16 and btf.type(4).ref == 23
    assert btf.type(7).enumerators == (("RED", 0), ("NEG", -1))
    assert btf.type(16).enumerators == (("HUGE", 1 << 40),)
    assert btf.type(11).params == (("x", 1), ("p", 3))
    assert btf.type(13).linkage == 1
    assert btf.type(14).vars == ((13, 32, 16),)
    assert btf.type(5).members[1] == Member("flag", 22, 32, 3)


def test_member_paths(btf: Btf) -> None:
    assert btf.offsetof("outer", "thread.pkru") == 8
    assert btf.member("struct outer", "thread.flag2") == Member("flag2", 22, 64 + 35, 5)
    assert btf.offsetof("outer", "thread.arr") == 16
    assert btf.offsetof("outer", "thread.arr[3]") == 19
    assert btf.offsetof("outer", "b") == 32  # through the anonymous union
    assert btf.offsetof("outer", "ctxs[1].gen") == 44
    assert btf.offsetof("outer_t", "thread.pkru") == 8  # through the typedef
    m = btf.member("outer", "head")
    assert btf.describe(m.type_id) == "volatile const int"
    assert btf.describe(btf.member("outer", "thread.arr").type_id) == "char [16]"
    assert btf.describe(3) == "struct outer *"


def test_sizes_and_lookup(btf: Btf) -> None:
    assert btf.sizeof("struct outer") == 48
    assert btf.sizeof("u32") == 4
    assert btf.sizeof(4) == 16 and btf.sizeof(3) == 8 and btf.sizeof(25) == 8
    assert btf.sizeof(24) == 8
    assert btf.find("outer").kind == Kind.STRUCT
    assert btf.find("enum color").kind == Kind.ENUM
    assert btf.find("enum big").kind == Kind.ENUM64
    assert btf.ids("outer") == [17] and btf.ids("nothing") == []
    assert btf.datasec_vars(".data..percpu") == {"my_percpu": (32, 16)}
    assert btf.strip(10).kind == Kind.INT


def test_lookup_errors_name_the_problem(btf: Btf) -> None:
    with pytest.raises(BtfError, match="no type 'struct nope'"):
        btf.find("struct nope")
    with pytest.raises(BtfError, match="no member 'thread.nope'"):
        btf.member("outer", "thread.nope")
    with pytest.raises(BtfError, match="non-array"):
        btf.member("outer", "thread[1]")
    with pytest.raises(BtfError, match="has no members"):
        btf.member("outer", "head.x")
    with pytest.raises(BtfError, match="bad member path"):
        btf.member("outer", "thread..pkru")
    with pytest.raises(BtfError, match="out of range"):
        btf.type(999)
    with pytest.raises(BtfError, match="no size"):
        btf.sizeof(12)


def test_forward_declaration_loses_to_definition() -> None:
    b = Btf.parse(encode_btf([Type(0, Kind.FWD, "s"),
                              Type(0, Kind.STRUCT, "s", size=4, members=())]))
    assert b.find("s").kind == Kind.STRUCT and b.find("s").id == 2


def test_malformed_blobs_are_errors() -> None:
    good = encode_btf(TYPES)
    with pytest.raises(BtfError, match="magic"):
        Btf.parse(b"\0" * 32)
    with pytest.raises(BtfError, match="too short"):
        Btf.parse(good[:10])
    with pytest.raises(BtfError, match="out of bounds"):
        Btf.parse(good[: len(good) // 2])
    bad_kind = bytearray(good)
    struct.pack_into("<I", bad_kind, 24 + 4, 31 << 24)  # first record: kind 31
    with pytest.raises(BtfError, match="unknown BTF kind"):
        Btf.parse(bytes(bad_kind))
    bad_version = bytearray(good)
    bad_version[2] = 2
    with pytest.raises(BtfError, match="version"):
        Btf.parse(bytes(bad_version))


def test_big_endian_blob() -> None:
    b = Btf.parse(encode_btf(TYPES, endian=">"))
    assert b.offsetof("outer", "ctxs[1].gen") == 44


def test_subset_keeps_layouts_and_cuts_pointers(btf: Btf) -> None:
    small = Btf.parse(subset(btf, ["inner"], keep_vars={".data..percpu": ["my_percpu"]}))
    assert small.sizeof("struct inner") == 24
    assert small.offsetof("inner", "arr[2]") == 10
    assert small.datasec_vars(".data..percpu") == {"my_percpu": (32, 16)}
    assert small.ids("outer") == []
    outer = Btf.parse(subset(btf, ["outer"]))
    # the pointer in the anonymous union now leads to a forward declaration
    ptr = outer.type(outer.member("outer", "b").type_id)
    assert outer.describe(ptr.id) == "struct outer *" or ptr.kind == Kind.PTR
    assert outer.offsetof("outer", "ctxs[1].gen") == 44
