"""The HPACK codec of `pushlib.h2transport` against hpack's own: the memoised encoder and the
decoder must produce and read exactly what hpack does, whatever the table does meanwhile."""

from __future__ import annotations

import random
from typing import Any

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman

from pushlib.h2transport import _MemoDecoder, _PlainEncoder, huffman_decode

HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
NAMES = (b":status", b"server", b"date", b"apns-id", b"content-length", b"retry-after", b"x-custom",
         b"content-type", b"authorization")


def _headers(rng: random.Random) -> list[hpack.HeaderTuple]:
    out = []
    for _ in range(rng.randrange(1, 9)):
        name = rng.choice(NAMES)
        value = rng.choice([b"200", b"nginx", b"0", b"x" * rng.randrange(0, 300), str(rng.randrange(10**9)).encode(),
                            bytes(rng.randrange(32, 127) for _ in range(rng.randrange(0, 40)))])
        out.append(rng.choice([hpack.HeaderTuple, hpack.NeverIndexedHeaderTuple])(name, value))
    return out


def _typed(headers: list[hpack.HeaderTuple]) -> list[tuple[type, bytes, bytes]]:
    return [(type(h), h[0], h[1]) for h in headers]


def test_huffman_decode_matches_hpack_on_valid_and_garbage_input() -> None:
    rng = random.Random(1)
    for _ in range(5000):
        plain = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        coded = HUFFMAN.encode(plain)
        assert huffman_decode(coded) == decode_huffman(coded) == plain
    for _ in range(5000):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 10)))
        try:
            expected: bytes | None = decode_huffman(garbage)
        except hpack.HPACKDecodingError:
            expected = None
        if expected is None:
            with pytest.raises(hpack.HPACKDecodingError):
                huffman_decode(garbage)
        else:
            assert huffman_decode(garbage) == expected


@pytest.mark.parametrize("seed", range(40))
def test_decoder_reads_what_hpack_reads(seed: int) -> None:
    """Blocks from hpack's encoder (Huffman or not, indexed, never indexed, table size updates,
    evictions from a small table) decode to the same typed headers and leave the same table."""
    rng = random.Random(seed)
    encoder, ours, theirs = hpack.Encoder(), _MemoDecoder(), hpack.Decoder()
    for block_number in range(60):
        if block_number % 17 == 5:
            encoder.header_table_size = rng.choice([0, 64, 256, 4096])
        block = encoder.encode(_headers(rng), huffman=rng.random() < 0.7)
        assert _typed(ours.decode(block, raw=True)) == _typed(list(theirs.decode(block, raw=True)))
        assert list(ours.header_table.dynamic_entries) == list(theirs.header_table.dynamic_entries)


@pytest.mark.parametrize(
    "block",
    [
        b"\x82\xff",  # indexed field then a truncated integer
        b"\x00\x85abc",  # literal name longer than the block
        b"\x40\x01a\x05ab",  # literal value longer than the block
        b"\xbf\xff\xff\xff\xff\xff\x01",  # integer over five bytes
        b"\xff\x80",  # index out of any table
        b"\x82\x3f\xe1\x1f",  # size update after a field
        b"\x00\x81\xff\x01a",  # invalid Huffman name (EOS)
    ],
)
def test_decoder_refuses_what_hpack_refuses(block: bytes) -> None:
    with pytest.raises(hpack.HPACKDecodingError):
        list(hpack.Decoder().decode(block, raw=True))
    with pytest.raises(hpack.HPACKDecodingError):
        _MemoDecoder().decode(block, raw=True)


def test_decoder_keeps_hpacks_limits() -> None:
    block = hpack.Encoder().encode([(b"x-big", b"v" * 200)] * 5)
    for decoder in (hpack.Decoder(max_header_list_size=500), _MemoDecoder()):
        decoder.max_header_list_size = 500
        with pytest.raises(hpack.OversizedHeaderListError):
            decoder.decode(block, raw=True)
    resize = b"\x3f\xe1\x1f"  # table size update to 4096
    for small in (hpack.Decoder(), _MemoDecoder()):
        small.max_allowed_table_size = 100
        with pytest.raises(hpack.InvalidTableSizeError):
            small.decode(resize, raw=True)


def test_decoder_memo_is_bounded() -> None:
    encoder, decoder = hpack.Encoder(), _MemoDecoder()
    for i in range(5000):  # ever-new Huffman-coded values, as apns-id is
        block = encoder.encode([hpack.NeverIndexedHeaderTuple(b"apns-id", b"%036d" % i)], huffman=True)
        assert decoder.decode(block, raw=True) == [(b"apns-id", b"%036d" % i)]
    assert len(decoder._strings) <= 1024


def _in_table(table: Any, header: hpack.HeaderTuple, block: list[hpack.HeaderTuple]) -> bool:
    """A field equal to an entry of the static or dynamic table, or to an indexable field of its
    own block (which enters the table while the block is encoded): hpack may send a reference."""
    found = table.search(header[0], header[1])
    if found is not None and found[2] is not None:
        return True
    return any(other.indexable and tuple(other) == tuple(header) for other in block)


@pytest.mark.parametrize("seed", range(40))
def test_encoder_blocks_decode_to_the_input_and_equal_hpacks(seed: int) -> None:
    """Our blocks decode (hpack's decoder, in order) to what was encoded, never-indexed flags kept,
    while the table fills, evicts and resizes; and they are hpack's own bytes, except where a
    never-indexed value happens to equal a table entry (hpack then sends a reference, we a literal)."""
    rng = random.Random(seed)
    ours, theirs, decoder = _PlainEncoder(), hpack.Encoder(), hpack.Decoder()
    for block_number in range(60):
        if block_number % 13 == 7:
            size = rng.choice([0, 128, 512, 4096])
            ours.header_table_size = theirs.header_table_size = size
        headers = _headers(rng)
        table = theirs.header_table
        clash = any(_in_table(table, h, headers) for h in headers if not h.indexable)
        block = ours.encode(headers)
        expected = theirs.encode(headers, huffman=False)
        decoded = decoder.decode(block, raw=True)
        assert [tuple(h) for h in decoded] == [tuple(h) for h in headers]
        if not clash:
            assert block == expected
            assert [isinstance(h, hpack.NeverIndexedHeaderTuple) for h in decoded] == [
                not h.indexable for h in headers]
        assert list(ours.header_table.dynamic_entries) == list(table.dynamic_entries)


def test_encoder_memo_follows_a_new_jwt() -> None:
    """A JWT rotation indexes a new authorization value: every reference moves, the memo starts over."""
    encoder, decoder = _PlainEncoder(), hpack.Decoder()
    common = [hpack.HeaderTuple(b":method", b"POST"), hpack.HeaderTuple(b"apns-topic", b"com.example")]
    for jwt in (b"bearer one", b"bearer two", b"bearer three"):
        for i in range(3):
            headers = [*common, hpack.HeaderTuple(b"authorization", jwt),
                       hpack.NeverIndexedHeaderTuple(b":path", b"/3/device/%d" % i)]
            assert [tuple(h) for h in decoder.decode(encoder.encode(headers), raw=True)] == \
                [tuple(h) for h in headers]
    assert encoder.header_table.dynamic_entries[0] == (b"authorization", b"bearer three")
