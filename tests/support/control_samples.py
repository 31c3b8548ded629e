"""One valid control message per kind (from the coordinator, or from a node to the coordinator): the base
that tests/e2e/test_security_fuzz.py mutates and tests/unit/test_control_rejects.py breaks one field of.
Imported as `support.control_samples` (tests/ is on the path: [tool.pytest] pythonpath)."""
from meshsl.protocol.envelope import Kind

VALID_CONTROL_META = {
    Kind.BEGIN: {"lanes": [0], "micro_batches": 2, "epoch": 0, "train_step": 0},
    Kind.RUN: {"first_step": 0, "count": 2, "micro_batches": 2, "hold_checkpoint": False},
    Kind.RESTORE: {"checkpoint": 0, "round": 5, "endpoints": {}},
    Kind.WEIGHTS_PULL: {"segment": "bottom"},
    Kind.DONE: {"tasks": {"digit": {"loss_sum": 1.0, "correct": 1, "count": 2}}, "bytes": {}},
    Kind.HELLO: {"checkpoints": [0], "endpoint": "tcp://127.0.0.1:1"},
    Kind.ACK: {"of": "weights", "segment": "bottom"},
}
