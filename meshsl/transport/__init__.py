"""One transport interface; a ZeroMQ backend (tcp, ipc) and an in-process backend for tests and simulation."""
from meshsl.transport.base import Transport, make_transport

__all__ = ["Transport", "make_transport"]
