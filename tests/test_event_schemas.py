"""The event and control examples of schemas/README.md are what the ledger reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ledger_events import heartbeat, job

from dispatch import events, schema
from dispatch.errors import InvalidMessageError
from dispatch.events import ControlOp, Event
from dispatch.ledger import Ledger, LedgerState
from dispatch.ledger.control import parse_request

README = Path(__file__).resolve().parent.parent / "schemas" / "README.md"
_BLOCK = re.compile(r"^```json\n(.*?)^```", re.M | re.S)


def _examples(name: str) -> list[dict]:
    found = [json.loads(b) for b in _BLOCK.findall(README.read_text(encoding="utf-8"))]
    return [f["message"] for f in found if f["schema"] == name]


def test_the_claim_example_goes_over_msgpack_into_the_ledger(tmp_path):
    (claim,) = _examples(schema.EVENT)
    claim["request"]["body"] = claim["request"]["body"].encode()  # msgpack bin on the wire
    body = events.decode(events.encode(claim))
    led = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        assert led.apply(body)
        rec = led.job("job-2f9c1e7a")
        assert (rec.state, rec.owner, rec.memory_mb) == (LedgerState.CLAIMED, "alice", 2048)
        assert rec.notify_user == "alice@example.org"
    finally:
        led.close()


def test_the_control_example_is_a_valid_request_of_its_sender():
    (order,) = [o for o in _examples(schema.CONTROL) if o["op"] == "hold"]
    request = parse_request(events.decode(events.encode(order), what="control"), "alice")
    assert request.op is ControlOp.HOLD and request.job_ids == ("job-2f9c1e7a", "job-51b0c3d2")


@pytest.mark.parametrize("event", [e for e in Event if e is not Event.OFFLINE])
def test_every_event_the_tests_build_follows_the_schema(event):
    body = heartbeat() if event is Event.HEARTBEAT else job(event, "j1", reason="r")
    schema.validate(schema.EVENT, body, InvalidMessageError)


def test_a_control_request_without_a_user_id_is_refused_naming_the_property():
    with pytest.raises(InvalidMessageError) as info:
        parse_request({"op": "remove", "job_ids": ["j1"]}, None)
    assert info.value.field == "user_id"


def test_drain_is_not_a_user_request():
    with pytest.raises(InvalidMessageError) as info:
        parse_request({"op": "drain", "node": "n1"}, "alice")
    assert info.value.field == "op"
