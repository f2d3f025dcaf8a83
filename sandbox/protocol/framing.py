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

# Frame types. Direction matters: a child may only send the ones in CHILD_TYPES.
READY, CALL, RESULT, ERROR, POST, EVENT, LOADERR = 1, 2, 3, 4, 5, 6, 7
NAMES = {READY: "READY", CALL: "CALL", RESULT: "RESULT", ERROR: "ERROR", POST: "POST",
         EVENT: "EVENT", LOADERR: "LOADERR"}
CHILD_TYPES = frozenset({READY, RESULT, ERROR, EVENT, LOADERR})
HOST_TYPES = frozenset({CALL, POST})


Frame = namedtuple("Frame", "type call_id payload")


def encode_header(ftype: int, call_id: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, length, call_id)


def encode_frame(ftype: int, call_id: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, len(payload), call_id) + payload


class FrameDecoder:
    """Feed bytes, get whole frames. Any breach raises ProtocolViolation and poisons the decoder."""

    __slots__ = ("_max", "_allowed", "_buf", "_need", "_head", "_broken")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, allowed_types=CHILD_TYPES):
        self._max = max_frame
        self._allowed = allowed_types
        self._buf = bytearray()
        self._head = None  # parsed header of the frame being collected
        self._need = HEADER_SIZE
        self._broken = False

    @property
    def pending(self) -> int:
        """Bytes buffered towards an incomplete frame (0 between frames)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._broken:
            raise ProtocolViolation("decoder already failed; the stream can't be trusted")
        try:
            return self._feed(data)
        except ProtocolViolation:
            self._broken = True
            self._buf = bytearray()
            raise

    def _feed(self, data: bytes) -> list[Frame]:
        frames = []
        self._buf += data
        while len(self._buf) >= self._need:
            if self._head is None:
                self._head = self._parse_header(bytes(self._buf[:HEADER_SIZE]))
                del self._buf[:HEADER_SIZE]
                self._need = self._head[1]
                if self._need:
                    continue
            ftype, length, call_id = self._head
            payload = bytes(self._buf[:length])
            del self._buf[:length]
            frames.append(Frame(ftype, call_id, payload))
            self._head = None
            self._need = HEADER_SIZE
        return frames

    def _parse_header(self, raw: bytes):
        magic, version, ftype, length, call_id = HEADER.unpack(raw)
        if magic != MAGIC:
            raise ProtocolViolation(f"bad frame magic {magic!r}")
        if version != VERSION:
            raise ProtocolViolation(f"unsupported protocol version {version}")
        if ftype not in self._allowed:
            raise ProtocolViolation(f"frame type {ftype} is not allowed in this direction")
        if length > self._max:
            raise ProtocolViolation(f"frame of {length} bytes exceeds the {self._max}-byte cap")
        return ftype, length, call_id

    def read_size(self, floor: int = 65536, ceiling: int = 1 << 20) -> int:
        """How much to ask the next read for: enough for the frame being collected, within bounds.

        Asking os.read for a megabyte every time costs an mmap per read; asking for a little
        costs many reads for a big frame."""
        missing = self._need - len(self._buf)
        return min(max(missing, floor), ceiling)

    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (EOF here is clean; elsewhere it is truncation)."""
        return self._head is None and not self._buf
