"""The hot-path entry encoder is byte-identical to encoding the Entry's wire map."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.entry import Entry, encode_entry_parts, leaf_hash, leaf_hash_raw, packed_str

pytestmark = pytest.mark.timeout(60)

names = st.text(min_size=1, max_size=40)
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


@settings(max_examples=300, deadline=None)
@given(ctx=names, seq=st.integers(1, (1 << 64) - 1), key=st.text(max_size=30), payload=st.binary(max_size=70_000),
       md=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=20), max_size=4),
       lamport=u64, ts=u64, writer=names)
def test_fast_encoder_matches_the_wire_map(ctx, seq, key, payload, md, lamport, ts, writer):
    h = leaf_hash(ctx, seq, key, payload, md, lamport, ts, writer)
    assert h == leaf_hash_raw(ctx.encode(), seq, key.encode(), payload, md, lamport, ts, writer.encode())
    e = Entry(ctx, seq, key, payload, md, lamport, ts, writer, h)
    fast = encode_entry_parts(packed_str(ctx), seq, key, payload, md, lamport, ts, packed_str(writer), h)
    assert fast == e.encode()
