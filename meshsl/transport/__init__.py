"""One transport interface; a ZeroMQ backend (tcp, ipc) and an in-process backend for tests and simulation."""
from meshsl.transport import inprocess, zmq_backend  # noqa: F401  (each registers itself with the base)
from meshsl.transport.base import Transport, make_transport, register_backend
from meshsl.transport.inprocess import InProcessHub

__all__ = ["InProcessHub", "Transport", "make_transport", "register_backend"]
