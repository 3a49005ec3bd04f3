"""The error tree: every library error caught at the broker edge becomes one of ours."""

from __future__ import annotations

import amqp.exceptions
import kombu.exceptions
import pytest

from dispatch import errors
from dispatch.broker import safe_url, translated

LIBRARY_ERRORS = [
    amqp.exceptions.NotFound("no exchange"),
    amqp.exceptions.AccessRefused("refused"),
    amqp.exceptions.PreconditionFailed("inequivalent arg"),
    amqp.exceptions.ConnectionForced("shutdown"),
    amqp.exceptions.RecoverableConnectionError("gone"),
    kombu.exceptions.OperationalError("down"),
    ConnectionRefusedError("refused"),
    TimeoutError("slow"),
]


@pytest.mark.parametrize("exc", LIBRARY_ERRORS, ids=lambda e: type(e).__name__)
def test_every_caught_library_error_is_translated_into_a_broker_error(exc):
    with pytest.raises(errors.BrokerError) as info, translated("doing a thing"):
        raise exc
    assert str(info.value).startswith("doing a thing")
    assert info.value.__cause__ is exc


def test_all_errors_derive_from_one_root_and_end_in_error():
    for name in dir(errors):
        obj = getattr(errors, name)
        ours = isinstance(obj, type) and obj.__module__ == errors.__name__
        if ours and issubclass(obj, Exception):
            assert name.endswith("Error")
            assert issubclass(obj, errors.DispatchError)


def test_invalid_job_errors_name_their_field_in_the_reason():
    assert errors.InvalidMessageError("is required", field="Cmd").reason == "Cmd: is required"
    assert errors.InvalidJobFileError("Cmd: x", field="Cmd").reason == "Cmd: x"


def test_passwords_never_appear_in_broker_urls_we_print():
    assert "s3cret" not in safe_url("amqp://user:s3cret@host:5672//")
    assert "s3cret" not in safe_url("not a url at all s3cret")
