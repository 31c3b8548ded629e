"""What sites, submitters and the broker say to each other: one JSON frame per message, one class each.
Anything that does not parse into one of these classes is refused (ProtocolError), never acted on."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError

from meshsl.errors import ProtocolError
from meshsl.apps.sites.specs import NAME, JobDocument, Strict

MAX_MESSAGE_BYTES = 8 * 2**20
JobId = Annotated[str, Field(pattern=r"^[a-z0-9-]{8,64}$")]


class Register(Strict):
    """site -> broker, on every (re)connection: signed, so only the site's own key can claim its name."""
    type: Literal["register"] = "register"
    site: str = Field(pattern=NAME)
    time: float
    signature: str


class Decision(Strict):
    type: Literal["decision"] = "decision"
    job: JobId
    verdict: Literal["approve", "refuse", "wait"]
    reason: str = Field(default="", max_length=20_000)


class Status(Strict):
    type: Literal["status"] = "status"
    job: JobId
    state: Literal["running", "finished", "failed", "aborted"]
    detail: str = Field(default="", max_length=20_000)
    logs: list[Annotated[str, Field(max_length=4000)]] = Field(default_factory=list, max_length=200)
    summary: dict[str, Any] = Field(default_factory=dict)


class Ping(Strict):
    type: Literal["ping"] = "ping"


class Submit(Strict):
    type: Literal["submit"] = "submit"
    job: JobDocument


class Query(Strict):
    type: Literal["query"] = "query"
    job: JobId


class Abort(Strict):
    """submitter -> broker: signed by the job's submitter."""
    type: Literal["abort"] = "abort"
    job: JobId
    submitter: str = Field(pattern=NAME)
    signature: str


class Offer(Strict):
    type: Literal["offer"] = "offer"
    job: JobDocument


class Start(Strict):
    type: Literal["start"] = "start"
    job: JobId


class Stop(Strict):
    type: Literal["stop"] = "stop"
    job: JobId
    state: Literal["refused", "failed", "aborted"]
    reason: str


class Reply(Strict):
    """broker -> submitter (or site), answering one request."""
    type: Literal["reply"] = "reply"
    ok: bool
    error: str = ""
    job: dict[str, Any] = Field(default_factory=dict)


Message = Annotated[Union[Register, Decision, Status, Ping, Submit, Query, Abort, Offer, Start, Stop, Reply],
                    Field(discriminator="type")]
_ADAPTER: TypeAdapter = TypeAdapter(Message)


def encode(message: Strict) -> bytes:
    return message.model_dump_json().encode()


def decode(frame: bytes, peer: str = "") -> Any:
    """The message in `frame`, or ProtocolError naming the peer and what is wrong."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversized", f"{len(frame)} bytes", peer)
    try:
        return _ADAPTER.validate_python(json.loads(frame))
    except (ValueError, UnicodeDecodeError) as exc:
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ProtocolError("malformed", detail[:200], peer) from None
