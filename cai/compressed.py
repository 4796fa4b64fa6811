"""Compressed files (gzip, bzip2, xz, zstd). Input is told by suffix or by its first bytes and
read decompressed as it is needed; bad or cut-off data is one InputError, not the codec's
exception. Output is named by its suffix and written as whole members (a gzip member, a bzip2 or
xz stream, a zstd frame) one after another, as `cat a.gz b.gz` makes: every reader of the format
reads them as one file, and a writer stopped mid-member leaves whole members before it
(`members` says where they end)."""

from __future__ import annotations

import bz2
import io
import lzma
import os
import zlib
from collections.abc import Callable, Iterator
from typing import IO

from cai.errors import InputError

COMPRESSED_SUFFIXES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}

_SIGNATURES = {"gzip": b"\x1f\x8b", "bzip2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}


def sniff_compression(head: bytes) -> str | None:
    """The compression whose signature `head` starts with (none of them can start UTF-8 text,
    bar bzip2's, which is checked further)."""
    for kind, signature in _SIGNATURES.items():
        if head.startswith(signature):
            if kind == "bzip2" and not (head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90")):
                continue
            return kind
    return None


def _decompressor(kind: str, name: str):
    if kind == "gzip":
        return lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)
    if kind == "bzip2":
        return bz2.BZ2Decompressor
    if kind == "xz":
        return lzma.LZMADecompressor
    try:
        import zstandard
    except ImportError:
        try:
            from compression.zstd import ZstdDecompressor       # Python 3.14's standard library
        except ImportError:
            raise InputError(name, "is zstd-compressed: reading it needs the zstandard package "
                                   "(pip install zstandard)") from None
        return ZstdDecompressor
    return zstandard.ZstdDecompressor().decompressobj


def compression_of(name: str) -> str | None:
    """The compression a file's name asks for (its last suffix: .gz, .bz2, .xz, .zst), or None."""
    return COMPRESSED_SUFFIXES.get(os.path.splitext(name)[1].lower())


def compressor(kind: str, name: str) -> Callable[[bytes], bytes]:
    """A function that makes one whole member of its bytes (a gzip member, a bzip2 or xz stream,
    a zstd frame with its checksum)."""
    if kind == "gzip":
        def gzip_member(data: bytes) -> bytes:
            codec = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            return codec.compress(data) + codec.flush()
        return gzip_member
    if kind == "bzip2":
        return bz2.compress
    if kind == "xz":
        return lzma.compress
    try:
        import zstandard
    except ImportError:
        try:
            from compression.zstd import compress       # Python 3.14's standard library
        except ImportError:
            raise InputError(name, "is named .zst: writing zstd needs the zstandard package "
                                   "(pip install zstandard)") from None
        return compress
    return zstandard.ZstdCompressor(write_checksum=True).compress


CUT = -1          # `members`' last end where the data stops inside a member


def members(fp: IO[bytes], kind: str, name: str, chunk_size: int = 1 << 16) -> Iterator[tuple[bytes, int | None]]:
    """The decompressed bytes of a stream of members as they come, as (bytes, None); after each
    whole member, (b"", where it ends: the stream's bytes up to there). Data that stops inside a
    member (cut off) ends it with (b"", CUT); bad data is an InputError."""
    new = _decompressor(kind, name)
    codec, at = None, 0                  # at: the stream's bytes before `chunk`
    while chunk := fp.read(chunk_size):
        while chunk:
            if codec is None:
                if not chunk.startswith(_SIGNATURES[kind][:len(chunk)]):
                    plain = at == 0 and chunk.lstrip()[:1] in (b"{", b"[")
                    raise _bad(name, kind, f"it does not start with the {kind} signature" if at == 0
                               else f"no {kind} data at byte {at}",
                               "; it is plain JSON text under a compressed name: rename it without the suffix, "
                               "or compress it" if plain else "")
                codec = new()
            try:
                out = codec.decompress(chunk)
            except InputError:
                raise
            except Exception as exc:        # zlib.error, OSError, lzma.LZMAError, zstandard.ZstdError…
                raise _bad(name, kind, str(exc) or type(exc).__name__) from None
            if out:
                yield out, None
            if codec.eof:
                rest = codec.unused_data
                at += len(chunk) - len(rest)
                yield b"", at
                codec, chunk = None, rest
            else:
                at += len(chunk)
                chunk = b""
    if codec is not None:
        yield b"", CUT


def _bad(name: str, kind: str, detail: str, hint: str = "") -> InputError:
    return InputError(name, f"not a valid {kind} file ({detail}){hint}")


class Decompressing(io.RawIOBase):
    """The decompressed bytes of a compressed stream (gzip, bzip2, xz or zstd; several members or
    frames one after another, as `cat a.gz b.gz` makes), read as they are needed. Bad or cut-off
    data is one InputError, not the codec's exception."""

    CHUNK = 1 << 16

    def __init__(self, fp: IO[bytes], kind: str, name: str, on_cut: Callable[[], None] | None = None):
        """`on_cut`: called where the data stops inside a member (a writer stopped mid-member),
        which then reads as the end; without it, that is an InputError."""
        super().__init__()
        self._members = members(fp, kind, name, self.CHUNK)
        self._kind, self._name, self._on_cut = kind, name, on_cut
        self._out, self._at = b"", 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out) and not self._done:
            self._out, self._at = self._fill(), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _fill(self) -> bytes:
        for data, end in self._members:
            if end == CUT:
                if self._on_cut is None:
                    raise _bad(self._name, self._kind, "it ends early: cut off?")
                self._on_cut()
            elif data:
                return data
        self._done = True
        return b""


def open_stream(fp: IO[bytes], name: str, head_size: int = 16, kind: str | None = None,
                on_cut: Callable[[], None] | None = None) -> tuple[IO[bytes], bytes]:
    """(the stream to read, decompressed where `kind` or the first bytes say so; those first
    bytes of the data as stored). A stream that cannot seek keeps the bytes it was peeked at.
    `on_cut`: see Decompressing."""
    if fp.seekable():
        head = fp.read(head_size)
        fp.seek(-len(head), io.SEEK_CUR)
    else:
        head = fp.read(head_size)
        fp = io.BufferedReader(_Rejoined(head, fp))
    kind = kind or sniff_compression(head)
    return (io.BufferedReader(Decompressing(fp, kind, name, on_cut)) if kind else fp), head


class _Rejoined(io.RawIOBase):
    """Bytes already read from a stream, then the rest of it."""

    def __init__(self, head: bytes, fp: IO[bytes]):
        super().__init__()
        self._head, self._fp = head, fp

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._fp.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
