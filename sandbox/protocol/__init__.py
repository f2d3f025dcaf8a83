"""The wire format between host and worker: frames (framing) and plain-data payloads (codec)."""
from .codec import DEFAULT_LIMITS, Encoder, Limits, NotPlainData, dumps, loads
from .framing import (CALL, CHILD_TYPES, DEFAULT_MAX_FRAME, ERROR, EVENT, HEADER_SIZE, HOST_TYPES,
                      LOADERR, POST, READY, RESULT, Frame, FrameDecoder, encode_frame)

__all__ = ["DEFAULT_LIMITS", "Encoder", "Limits", "NotPlainData", "dumps", "loads", "CALL", "CHILD_TYPES",
           "DEFAULT_MAX_FRAME", "ERROR", "EVENT", "HEADER_SIZE", "HOST_TYPES", "LOADERR", "POST",
           "READY", "RESULT", "Frame", "FrameDecoder", "encode_frame"]
