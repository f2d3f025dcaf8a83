"""Length-prefixed frames: a fixed 16-byte header, then a msgpack payload.

Pure functions and a push-style decoder; no I/O. The header is checked against the cap
before a single payload byte is buffered, so a 5-byte lie can't make the host allocate.
"""
import struct
from collections import namedtuple

from ..errors import ProtocolViolation

MAGIC = b"SB"
VERSION = 1
HEADER = struct.Struct("<2sBBIQ")  # magic, version, type, payload length, call id
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
# From this size a payload travels apart from its header (writev, no copy behind 16 bytes), is
# read straight into its own buffer, and is packed or collected in a buffer kept for the next.
LARGE = 65536
KEEP_MAX = 4 * 1024 * 1024  # the largest buffer a decoder keeps (FrameDecoder(reuse=True))

# Frame types. Direction matters: a child may only send the ones in CHILD_TYPES.
READY, CALL, RESULT, ERROR, POST, EVENT, LOADERR = 1, 2, 3, 4, 5, 6, 7
CHILD_TYPES = frozenset({READY, RESULT, ERROR, EVENT, LOADERR})
HOST_TYPES = frozenset({CALL, POST})


Frame = namedtuple("Frame", "type call_id payload")
_frame = tuple.__new__  # _frame(Frame, (type, call_id, payload)): skips namedtuple's Python-level __new__
_unpack_header = HEADER.unpack_from


def encode_frame(ftype: int, call_id: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, len(payload), call_id) + payload


def single_frame(data, max_frame: int):
    """(type, call id) when `data` is exactly one whole frame whose header keeps every rule but
    the direction (magic, version, length within the cap), else None: the usual read, which the
    readers decode in one step. Anything else goes through a FrameDecoder, which says what is wrong."""
    if len(data) <= HEADER_SIZE:
        return None
    magic, version, ftype, length, call_id = _unpack_header(data, 0)
    if len(data) == HEADER_SIZE + length and magic == MAGIC and version == VERSION and length <= max_frame:
        return ftype, call_id
    return None


class FrameDecoder:
    """Feed bytes, get whole frames. Any breach raises ProtocolViolation and poisons the decoder.

    A payload is collected in one buffer of exactly the announced size (allocated only after the
    header passed the cap), and large ones can be read straight into it (`payload_view`/`advance`),
    so a 1 MiB frame costs one copy, not three.
    """

    __slots__ = ("_max", "_allowed", "_hbuf", "_head", "_payload", "_filled", "_broken", "_reuse", "_kept", "_lent",
                 "_in_kept")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, allowed_types=CHILD_TYPES, *, reuse: bool = False):
        """`reuse`: collect large payloads in one buffer kept across frames (up to KEEP_MAX), so
        a stream of big messages doesn't fault in fresh pages for each. The frame's payload is
        then a view that a later frame overwrites: decode the frames one feed() returns before
        the next feed()."""
        self._max = max_frame
        self._allowed = allowed_types
        self._reuse = reuse
        self._kept: bytearray | None = None
        self._lent = False  # the kept buffer holds a frame being collected or being returned
        self._in_kept = False  # the frame being collected is in the kept buffer
        self._hbuf = bytearray()
        self._head: tuple[int, int, int] | None = None  # (type, length, call_id) of the frame being collected
        self._payload: bytearray | memoryview | None = None
        self._filled = 0
        self._broken = False

    @property
    def pending(self) -> int:
        """Bytes buffered towards an incomplete frame (0 between frames)."""
        return len(self._hbuf) + self._filled

    def feed(self, data) -> list[Frame]:
        if self._broken:
            self._check()
        self._lent = self._in_kept and self._head is not None
        try:
            if self._head is None and not self._hbuf:
                one = single_frame(data, self._max)  # the hot path: one read, one whole frame
                if one is not None and one[0] in self._allowed:
                    return [_frame(Frame, (one[0], one[1], data[HEADER_SIZE:]))]
                return self._feed_whole(data)
            return self._feed(memoryview(data))
        except ProtocolViolation:
            self._poison()
            raise

    def _feed_whole(self, data) -> list[Frame]:
        """The common case, a read that starts on a frame boundary: slice frames out directly."""
        frames, off, n = [], 0, len(data)
        while n - off >= HEADER_SIZE:
            ftype, length, call_id = self._parse_header(data, off)
            end = off + HEADER_SIZE + length
            if end > n:
                break
            frames.append(_frame(Frame, (ftype, call_id, data[off + HEADER_SIZE:end])))
            off = end
        if off < n:
            frames += self._feed(memoryview(data)[off:])
        return frames

    def payload_view(self, at_least: int = LARGE):
        """Where the rest of a large payload goes (for os.readv straight into it), else None."""
        if self._head is None or self._head[1] - self._filled < at_least:
            return None
        assert self._payload is not None  # set together with _head
        return memoryview(self._payload)[self._filled:]

    def advance(self, n: int) -> list[Frame]:
        """`n` bytes were written into payload_view()."""
        self._check()
        self._lent = self._in_kept and self._head is not None
        self._filled += n
        head = self._head
        assert head is not None  # payload_view() lent a buffer only for a frame being collected
        return [self._finish()] if self._filled == head[1] else []

    def _check(self):
        if self._broken:
            raise ProtocolViolation("decoder already failed; the stream can't be trusted")

    def _poison(self):
        self._broken = True
        self._hbuf = bytearray()
        self._payload = self._kept = None

    def _feed(self, mv) -> list[Frame]:
        frames = []
        while mv:
            if self._head is None:
                take = mv[:HEADER_SIZE - len(self._hbuf)]
                self._hbuf += take
                mv = mv[len(take):]
                if len(self._hbuf) < HEADER_SIZE:
                    break
                self._head = self._parse_header(self._hbuf, 0)
                self._hbuf.clear()
                self._payload = self._buffer(self._head[1])
                self._filled = 0
                if self._head[1] == 0:
                    frames.append(self._finish())
                continue
            length = self._head[1]
            payload = self._payload
            assert payload is not None  # set together with _head when its header was parsed
            take = min(len(mv), length - self._filled)
            payload[self._filled:self._filled + take] = mv[:take]
            self._filled += take
            mv = mv[take:]
            if self._filled == length:
                frames.append(self._finish())
        return frames

    def _buffer(self, length: int) -> bytearray | memoryview:
        self._in_kept = False
        if not self._reuse or length < LARGE or self._lent:
            return bytearray(length)  # (lent: a frame this feed() returns is still in the kept one)
        kept = self._kept
        if kept is None or len(kept) < length:
            kept = bytearray(length)  # allocated only after the header passed the cap
            if length > KEEP_MAX:
                return kept
            self._kept = kept
        self._lent = self._in_kept = True
        return memoryview(kept)[:length]

    def _finish(self) -> Frame:
        assert self._head is not None  # called only once a collected frame is complete
        ftype, _, call_id = self._head
        frame = _frame(Frame, (ftype, call_id, self._payload))
        self._head = None
        self._payload = None
        self._filled = 0
        return frame

    def _parse_header(self, raw, offset: int) -> tuple[int, int, int]:
        magic, version, ftype, length, call_id = HEADER.unpack_from(raw, offset)
        if magic != MAGIC:
            raise ProtocolViolation(f"bad frame magic {magic!r}")
        if version != VERSION:
            raise ProtocolViolation(f"unsupported protocol version {version}")
        if ftype not in self._allowed:
            raise ProtocolViolation(f"frame type {ftype} is not allowed in this direction")
        if length > self._max:
            raise ProtocolViolation(f"frame of {length} bytes exceeds the {self._max}-byte cap")
        return ftype, length, call_id

    def read_size(self, floor: int = LARGE, ceiling: int = 1 << 20) -> int:
        """How much to ask the next read for: enough for the frame being collected, within bounds.

        Asking os.read for a megabyte every time costs an mmap per read; asking for a little
        costs many reads for a big frame."""
        head = self._head
        if head is None:
            return floor
        missing = head[1] - self._filled
        return floor if missing < floor else missing if missing < ceiling else ceiling

    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (EOF here is clean; elsewhere it is truncation)."""
        return self._head is None and not self._hbuf
