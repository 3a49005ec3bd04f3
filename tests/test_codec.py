"""The header codec, job files and quantities: pure, fast unit tests."""

from __future__ import annotations

import signal

import pytest

from dispatch import headers
from dispatch.errors import InvalidJobFileError, InvalidMessageError, JobRejectedError
from dispatch.job import ArrayPlace, JobSpec, JobState, JobUpdate, Notify, Resources
from dispatch.jobfile import parse_requirement_string, requirements_expression, spec_from_fields
from dispatch.quantity import format_duration, parse_duration_s, parse_size_mib
from dispatch.result import JobResult
from dispatch.topology import ReplyAddress, pool_queue, reply_queue


@pytest.mark.parametrize(("raw", "plain", "quoted"), [
    ('"/bin/echo"', "/bin/echo", True),
    ('"say \\"hi\\""', 'say "hi"', True),
    ("/bin/echo", "/bin/echo", False),
    ('"a" == "b"', '"a" == "b"', False),
    ('"', '"', False),
])
def test_classad_quoted_strings_are_unquoted_and_expressions_left_alone(raw, plain, quoted):
    assert headers.unquote(raw) == (plain, quoted)


def test_quoting_round_trips():
    for text in ("Exited", 'with "quotes"', "back\\slash"):
        assert headers.unquote(headers.quote(text)) == (text, True)


def test_a_spec_survives_encoding_and_decoding():
    spec = JobSpec("sort", ("-n", "a b.txt"), environment={"A": "1"}, stdin="in.txt",
                   stdout="o.txt", stderr="e.txt", resources=Resources(2, 512, 100),
                   time_limit_s=60, kill_signal=int(signal.SIGINT),
                   requirements="Memory >= 512", max_attempts=5, name="n")
    request = headers.decode_request({"message_id": "j1", "priority": 7},
                                     headers.encode_request(spec))
    got = request.spec
    assert (got.command, got.arguments, dict(got.environment)) == ("sort", ("-n", "a b.txt"),
                                                                    {"A": "1"})
    assert (got.stdin, got.stdout, got.stderr) == ("in.txt", "o.txt", "e.txt")
    assert got.resources == Resources(2, 512, 100)
    assert (got.time_limit_s, got.kill_signal, got.max_attempts) == (60, signal.SIGINT, 5)
    assert (got.requirements, got.priority, got.name) == ("Memory >= 512", 7, "n")
    assert request.correlation_id == "j1"


def test_array_place_and_notifications_travel_as_headers():
    spec = JobSpec("true", array=ArrayPlace("a1", 3, 10),
                   notify=Notify("me@example.org", "http://hook/x", "Always"))
    encoded = headers.encode_request(spec)
    assert (encoded["ArrayId"], encoded["ArrayIndex"], encoded["ArraySize"]) == ("a1", 3, 10)
    got = headers.decode_request({"message_id": "a1.3"}, encoded).spec
    assert got.array == ArrayPlace("a1", 3, 10)
    assert got.notify == Notify("me@example.org", "http://hook/x", "Always")


def test_a_job_file_notify_block_becomes_the_notify_headers():
    spec = spec_from_fields({"command": "true", "notify": {"email": "me@example.org",
                                                           "when": "error"}})
    assert spec.notify == Notify("me@example.org", None, "Error")


def test_default_attributes_are_left_out_of_the_headers():
    assert headers.encode_request(JobSpec("true")) == {"Cmd": "true"}


def test_string_forms_from_limited_producers_are_understood():
    request = headers.decode_request({}, {
        "Cmd": "env", "Arguments": "-u 'X Y'", "Environment": "A=1;B=two words",
        "RequestCpus": "2", "TimeLimit": "30", "KillSig": "INT", "JobId": "from-header"})
    assert request.job_id == "from-header"
    assert request.spec.arguments == ("-u", "X Y")
    assert dict(request.spec.environment) == {"A": "1", "B": "two words"}
    assert request.spec.resources.cpus == 2
    assert (request.spec.time_limit_s, request.spec.kill_signal) == (30, signal.SIGINT)


def test_bytes_headers_that_are_not_utf8_are_refused_naming_the_header():
    with pytest.raises(InvalidMessageError) as info:
        headers.decode_request({}, {"Cmd": b"\xff\xfe"})
    assert info.value.field == "Cmd"


def test_reply_headers_are_quoted_only_when_the_request_was():
    env = headers.envelope({"message_id": "j"}, {"Cmd": '"/bin/true"'})
    quoted = headers.reply_headers(JobState.EXITED, env, exit_code=0, host="n1")
    assert quoted["JobState"] == '"Exited"' and quoted["RemoteHost"] == '"n1"'
    assert quoted["ExitCode"] == 0
    plain_env = headers.envelope({"message_id": "j"}, {"Cmd": "/bin/true"})
    assert headers.reply_headers(JobState.EXITED, plain_env)["JobState"] == "Exited"


def test_a_reply_decodes_back_into_an_update():
    env = headers.envelope({"message_id": "j"}, {"Cmd": '"x"', "Attempt": "2"})
    raw = headers.reply_headers(JobState.EXITED, env, exit_code=3, duration_s=0.5, host="h")
    update = headers.decode_reply(raw, b"zip")
    assert (update.job_id, update.state, update.exit_code, update.attempt) == ("j",
                                                                           JobState.EXITED, 3, 2)
    assert update.is_final and update.archive == b"zip"


def test_a_message_that_is_not_a_reply_is_refused():
    with pytest.raises(InvalidMessageError):
        headers.decode_reply({"JobState": "Dancing", "JobId": "x"}, b"")


@pytest.mark.parametrize(("text", "address"), [
    ("my-results", ReplyAddress("", "my-results")),
    ("/exchange/amq.direct/my_key", ReplyAddress("amq.direct", "my_key")),
    ("/queue/q1", ReplyAddress("", "q1")),
])
def test_reply_addresses_follow_rabbitmq_conventions(text, address):
    assert ReplyAddress.parse(text) == address


def test_names_come_from_the_topology_module():
    assert pool_queue("gpu") == "dispatch.pool.gpu"
    assert reply_queue("c1") == "dispatch.reply.c1"
    with pytest.raises(ValueError, match="invalid pool name"):
        pool_queue("no spaces")


@pytest.mark.parametrize(("text", "mib"), [("2625M", 2625), ("2G", 2048), ("512", 512),
                                           ("1.5G", 1536), ("100k", 1), (64, 64)])
def test_sizes_read_as_wq_users_write_them(text, mib):
    assert parse_size_mib(text) == mib


@pytest.mark.parametrize(("text", "seconds"), [("1d2h30m", 95400), ("90s", 90), ("45m", 2700),
                                               ("3600", 3600), (10, 10)])
def test_durations_read_as_wq_users_write_them(text, seconds):
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("bad", ["lots", "1x", "-5", "2 days"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_s(bad)


def test_run_time_is_shown_the_qstat_way():
    assert format_duration(3) == "0:00:03"
    assert format_duration(95400) == "1+02:30:00"


def test_requirement_strings_override_as_in_wq():
    assert parse_requirement_string("cpus: 2; memory: 4G; group: gpu") == {
        "cpus": 2, "memory": "4G", "group": "gpu"}
    with pytest.raises(InvalidJobFileError) as info:
        parse_requirement_string("cpus: two")
    assert info.value.field == "requirements.cpus"


def test_labels_become_a_classad_expression():
    expr = requirements_expression({"group": ["gpu", "fast"], "notgroup": "slow",
                                    "host": ["n1", "n2"], "expression": "Memory > 1"})
    assert expr == ('stringListMember("gpu", Groups) && stringListMember("fast", Groups) && '
                    '!stringListMember("slow", Groups) && (Machine == "n1" || Machine == "n2")'
                    " && (Memory > 1)")


def test_a_command_string_is_split_like_a_shell_line():
    spec = spec_from_fields({"command": "grep -c 'a b' file.txt"})
    assert (spec.command, spec.arguments) == ("grep", ("-c", "a b", "file.txt"))
    spec = spec_from_fields({"command": ["/bin/echo", 1], "arguments": "x y",
                             "priority": "low", "requirements": {"time_limit": "1h"}})
    assert (spec.arguments, spec.priority, spec.time_limit_s) == (("1", "x", "y"), 1, 3600)


def test_a_rejected_result_raises_with_its_reason_on_request():
    rejected = JobResult(JobUpdate("j9", JobState.REJECTED, reason="Cmd: is required"))
    with pytest.raises(JobRejectedError, match="j9 rejected: Cmd: is required"):
        rejected.raise_for_rejection()
    JobResult(JobUpdate("j8", JobState.EXITED, exit_code=0)).raise_for_rejection()
