"""Entropy coding of integer streams with `constriction`'s ANS coder, for the compact artifact.

A section of the artifact (`torchslim.compact.artifact`) holds several *parts* (one per shared layer) coded
into one ANS stream, so the coder's final state is paid once per section, not once per layer. Two kinds of part:

* **symbols** (`SectionWriter.add_symbols`): i.i.d. symbols of a small alphabet, the cluster indices. Their
  counts are written as a table, and the symbols are coded with the categorical model those counts define;
  the reader rebuilds the identical model from the same table (same floats, same quantisation), so decoding
  is exact.
* **gaps** (`SectionWriter.add_gaps`): the positions of the non-zero weights as the numbers of zeros before each
  of them (Deep Compression's relative indexing). A gap ``g`` is split Exp-Golomb style into a bucket
  ``b = floor(log2(g + 1))``, coded with a categorical model from the bucket counts, and the ``b`` low bits of
  ``g + 1``, coded with uniform models (in chunks of at most 16 bits). Long zero runs then cost a few extra
  bits instead of a large model table.

Section layout: ``varint(len(tables)) | tables | ANS words (uint32, little-endian)``. A table is
``varint(size) | size x varint(count)`` (LEB128 varints). Parts are decoded in the order they were added.

Example:
    >>> writer = SectionWriter()
    >>> writer.add_symbols(np.array([0, 3, 3, 1]), alphabet=4)
    >>> reader = SectionReader(writer.finish())
    >>> reader.read_symbols(4, alphabet=4)
    array([0, 3, 3, 1], dtype=int32)
"""

from __future__ import annotations

import numpy as np

CHUNK_BITS = 16  # constriction's uniform model takes alphabets below 2**24; 16-bit chunks stay well inside


class CodingError(ValueError):
    """The section's bytes do not decode (only after its checksum matched: a bug or a foreign writer)."""


def _coding():
    try:
        import constriction
    except ImportError as error:  # pragma: no cover - the compact extra installs it
        from torchslim.errors import InputError

        raise InputError(f"the compact artifact needs constriction (pip install 'torchslim[compact]'): "
                         f"{error}") from None
    return constriction.stream


def write_varint(value: int, out: bytearray) -> None:
    """Append ``value`` (>= 0) as an unsigned LEB128 varint."""
    if value < 0:
        raise ValueError(f"varint needs a non-negative value, got {value}")
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return


def read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """``(value, next offset)`` of the LEB128 varint at ``offset``."""
    value = shift = 0
    while True:
        if offset >= len(data):
            raise CodingError("a varint runs past the end of its table")
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset += 1
        if not byte & 0x80:
            return value, offset
        shift += 7


def _categorical(counts: np.ndarray):
    # Both sides build the model from the same integer counts, so the same floats and the same quantisation.
    table = np.asarray(counts, dtype=np.float64)
    if table.size < 2:
        table = np.concatenate([table, np.zeros(2 - table.size)])  # constriction needs two symbols at least
    return _coding().model.Categorical(table, perfect=False)


def gap_buckets(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exp-Golomb split of gaps >= 0: ``(bucket, offset)`` with ``gap + 1 = 2**bucket + offset``."""
    values = gaps.astype(np.int64) + 1
    buckets = np.zeros(values.shape, dtype=np.int64)
    rest = values >> 1
    while rest.any():  # floor(log2) without float rounding
        buckets += rest > 0
        rest >>= 1
    return buckets, values - (np.int64(1) << buckets)


def _offset_chunks(buckets: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each 16-bit chunk: (which symbols have bits there, how many bits they have there)."""
    chunks = []
    for start in range(0, int(buckets.max(initial=0)), CHUNK_BITS):
        bits = np.clip(buckets - start, 0, CHUNK_BITS)
        chunks.append((bits > 0, bits))
    return chunks


class SectionWriter:
    """Collects parts in decoding order; `finish` writes the tables and one ANS stream."""

    def __init__(self):
        self._tables = bytearray()
        self._parts: list[tuple[np.ndarray, object, np.ndarray | None]] = []  # (symbols, model, uniform sizes)

    def _table(self, counts: np.ndarray) -> None:
        write_varint(len(counts), self._tables)
        for count in counts:
            write_varint(int(count), self._tables)

    def add_symbols(self, symbols: np.ndarray, alphabet: int) -> None:
        """Code ``symbols`` (ints in ``[0, alphabet)``) with a categorical model of their counts."""
        symbols = np.asarray(symbols, dtype=np.int64).ravel()
        if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
            raise ValueError(f"symbols must lie in [0, {alphabet})")
        counts = np.bincount(symbols, minlength=alphabet)
        self._table(counts)
        if symbols.size:
            self._parts.append((symbols.astype(np.int32), _categorical(counts), None))

    def add_gaps(self, positions: np.ndarray) -> None:
        """Code the strictly increasing flat ``positions`` of the non-zeros as bucketed gaps."""
        positions = np.asarray(positions, dtype=np.int64).ravel()
        gaps = np.diff(positions, prepend=-1) - 1
        if gaps.size and gaps.min() < 0:
            raise ValueError("positions must be strictly increasing and >= 0")
        buckets, offsets = gap_buckets(gaps)
        counts = np.bincount(buckets, minlength=1)
        self._table(counts)
        if not gaps.size:
            return
        self._parts.append((buckets.astype(np.int32), _categorical(counts), None))
        for index, (present, bits) in enumerate(_offset_chunks(buckets)):
            values = (offsets[present] >> (CHUNK_BITS * index)) & ((np.int64(1) << bits[present]) - 1)
            self._parts.append((values.astype(np.int32), None, (np.int64(1) << bits[present]).astype(np.int32)))

    def finish(self) -> bytes:
        """The section: ``varint(len(tables)) | tables | ANS words``."""
        stream = _coding()
        coder = stream.stack.AnsCoder()
        uniform = stream.model.Uniform()
        for symbols, model, sizes in reversed(self._parts):  # a stack: the last part coded is the first decoded
            if sizes is None:
                coder.encode_reverse(symbols, model)
            else:
                coder.encode_reverse(symbols, uniform, sizes)
        out = bytearray()
        write_varint(len(self._tables), out)
        return bytes(out + self._tables) + coder.get_compressed().astype("<u4").tobytes()


class SectionReader:
    """Reads back the parts of a `SectionWriter` section, in the order they were added."""

    def __init__(self, payload: bytes):
        length, start = read_varint(payload, 0)
        self._tables, self._cursor = payload[start:start + length], 0
        words = payload[start + length:]
        if start + length > len(payload) or len(words) % 4:
            raise CodingError("the section's ANS stream is not a whole number of 32-bit words")
        stream = _coding()
        self._stream = stream
        self._coder = stream.stack.AnsCoder(np.frombuffer(words, dtype="<u4").astype(np.uint32))

    def _table(self) -> np.ndarray:
        size, self._cursor = read_varint(self._tables, self._cursor)
        counts = np.zeros(size, dtype=np.int64)
        for i in range(size):
            counts[i], self._cursor = read_varint(self._tables, self._cursor)
        return counts

    def read_symbols(self, count: int, alphabet: int) -> np.ndarray:
        """The next ``count`` symbols of an ``add_symbols`` part."""
        counts = self._table()
        if len(counts) != alphabet or int(counts.sum()) != count:
            raise CodingError(f"symbol table has {len(counts)} entries summing to {int(counts.sum())}, "
                              f"expected {alphabet} summing to {count}")
        if not count:
            return np.zeros(0, dtype=np.int32)
        return np.asarray(self._coder.decode(_categorical(counts), count), dtype=np.int32)

    def read_positions(self, count: int, limit: int) -> np.ndarray:
        """The next ``count`` flat positions (each < ``limit``) of an ``add_gaps`` part."""
        counts = self._table()
        if int(counts.sum()) != count:
            raise CodingError(f"gap table sums to {int(counts.sum())}, expected {count}")
        if not count:
            return np.zeros(0, dtype=np.int64)
        buckets = np.asarray(self._coder.decode(_categorical(counts), count), dtype=np.int64)
        offsets = np.zeros(count, dtype=np.int64)
        for index, (present, bits) in enumerate(_offset_chunks(buckets)):
            sizes = (np.int64(1) << bits[present]).astype(np.int32)
            values = np.asarray(self._coder.decode(self._stream.model.Uniform(), sizes), dtype=np.int64)
            offsets[present] |= values << (CHUNK_BITS * index)
        positions = np.cumsum((np.int64(1) << buckets) + offsets)
        positions -= 1
        if positions[-1] >= limit:
            raise CodingError(f"a decoded position ({int(positions[-1])}) lies outside the tensor ({limit} values)")
        return positions
