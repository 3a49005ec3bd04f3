"""The JSON Schemas, the examples in schemas/README.md and the header codec agree."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import pytest
import yaml

from dispatch import headers, jobfile, schema, topology
from dispatch.errors import InvalidMessageError, UnsatisfiableJobError
from dispatch.job import JobSpec, JobState
from dispatch.topology import ReplyAddress
from workers import intake
from workers.machine import Machine
from workers.slots import Slots

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
README = SCHEMAS / "README.md"
SCHEMA_NAMES = (schema.JOB_REQUEST, schema.JOB_REPLY, schema.JOBFILE, schema.EVENT, schema.CONTROL)
DEAD_LETTER_HEADERS = ("Reason", "x-dispatch-rejected-by", "x-original-exchange",
                       "x-original-routing-key")
# Python keyword of headers.reply_headers -> the header it writes.
REPLY_FIELDS = {
    "host": headers.REMOTE_HOST,
    "started_at": headers.STARTED_AT,
    "exit_code": headers.EXIT_CODE,
    "exit_by_signal": headers.EXIT_BY_SIGNAL,
    "exit_signal": headers.EXIT_SIGNAL,
    "duration_s": headers.JOB_DURATION,
    "reason": headers.REASON,
}
_FENCE = re.compile(r"^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_HEADING = re.compile(r"^#{2,4} (?P<title>.+)$", re.M)
_FIRST_LINE = re.compile(r'^\{"schema": "(?P<name>[a-z-]+)", "message": \{$')


@dataclasses.dataclass(frozen=True)
class Example:
    """One ```json block of the README: the schema it names and the message it shows."""

    title: str
    first_line: str
    schema: str
    message: dict[str, Any]


def _blocks(lang: str) -> list[tuple[str, str]]:
    """Return (title of the section, body) of each ```lang block of the README."""
    text = README.read_text(encoding="utf-8")
    found = []
    for block in _FENCE.finditer(text):
        if block["lang"] == lang:
            titles = [h["title"] for h in _HEADING.finditer(text, 0, block.start())]
            found.append((titles[-1] if titles else "", block["body"]))
    return found


def _examples() -> list[Example]:
    found = []
    for title, body in _blocks("json"):
        parsed = json.loads(body)
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        slug += f"-{sum(e.title.startswith(slug) for e in found) + 1}"
        found.append(Example(slug, body.splitlines()[0], parsed.pop("schema", ""),
                             parsed.pop("message", None)))
        assert not parsed, f"{title}: keys besides schema and message: {sorted(parsed)}"
    return found


EXAMPLES = _examples()
REQUESTS = [e for e in EXAMPLES if e.schema == schema.JOB_REQUEST]
REPLIES = [e for e in EXAMPLES if e.schema == schema.JOB_REPLY]
JOBFILES = [e for e in EXAMPLES if e.schema == schema.JOBFILE]


def _title(example: Example) -> str:
    return example.title


def _validator(name: str) -> jsonschema.protocols.Validator:
    loaded = schema.load(name)
    validator: jsonschema.protocols.Validator = jsonschema.validators.validator_for(loaded)(loaded)
    return validator


def _is_dead_letter(message: dict[str, Any]) -> bool:
    return "x-dispatch-rejected-by" in message["headers"]


def _as_published(message: dict[str, Any]) -> dict[str, Any]:
    """Return a request example as its producer sent it (a dead letter without its extras)."""
    raw = {k: v for k, v in message["headers"].items() if k not in DEAD_LETTER_HEADERS}
    return {**message, "headers": raw} if _is_dead_letter(message) else message


def _request(job_id: str, *, correlation_id: str | None = None,
             typed: bool | None = None) -> dict[str, Any]:
    """Return the one README request for ``job_id`` (typed: without a ``JobId`` header)."""
    found = []
    for example in REQUESTS:
        message = _as_published(example.message)
        env = headers.envelope(message.get("properties", {}), message["headers"])
        if (env.job_id == job_id
                and correlation_id in (None, env.correlation_id)
                and typed in (None, headers.JOB_ID not in message["headers"])):
            found.append(message)
    assert len(found) == 1, f"{len(found)} request examples for {job_id}"
    return found[0]


def _decoded_spec(message: dict[str, Any]) -> JobSpec:
    return headers.decode_request(message.get("properties", {}), message["headers"]).spec


# ------------------------------------------------------------------------ the schema files

@pytest.mark.parametrize("path", sorted(SCHEMAS.glob("*.schema.json")), ids=lambda p: p.name)
def test_every_schema_file_is_a_valid_json_schema_of_the_dialect_it_declares(path: Path) -> None:
    loaded = json.loads(path.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(loaded, default=None)
    assert validator is not None, f"{path.name}: unknown $schema {loaded.get('$schema')!r}"
    validator.check_schema(loaded)
    assert loaded["$id"] == "dispatch:" + path.name.removesuffix(".schema.json")


def test_the_schema_folder_holds_exactly_the_schemas_the_code_loads() -> None:
    on_disk = {p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json")}
    assert on_disk == set(SCHEMA_NAMES)
    assert schema.schemas_dir() == SCHEMAS


# ------------------------------------------------------------------- the README examples

def test_the_readme_has_an_example_of_every_schema() -> None:
    assert {e.schema for e in EXAMPLES} == set(SCHEMA_NAMES)


@pytest.mark.parametrize("example", EXAMPLES, ids=_title)
def test_every_readme_example_names_its_schema_on_its_first_line(example: Example) -> None:
    match = _FIRST_LINE.match(example.first_line)
    assert match is not None, example.first_line
    assert match["name"] == example.schema


@pytest.mark.parametrize("example", EXAMPLES, ids=_title)
def test_every_readme_example_validates_against_the_schema_it_names(example: Example) -> None:
    message = example.message
    validator = _validator(example.schema)
    if example.schema == schema.JOB_REQUEST:
        # The request schema applies once ClassAd strings are unquoted, as the codec does.
        message = {**message, "headers": headers.normalize(message["headers"])[0]}
    if example.schema == schema.JOB_REPLY:
        # Replies validate as sent (maybe quoted) and as a listener reads them.
        unquoted = {**message, "headers": headers.normalize(message["headers"])[0]}
        validator.validate(unquoted)
    validator.validate(message)


def test_the_yaml_job_file_is_the_json_job_file() -> None:
    ((_, text),) = _blocks("yaml")
    (as_json,) = JOBFILES
    assert yaml.safe_load(text) == as_json.message


# ------------------------------------------------------------------ examples and the codec

@pytest.mark.parametrize("example", REQUESTS, ids=_title)
def test_every_example_request_decodes_the_same_with_or_without_unquoting_first(
        example: Example) -> None:
    props, raw = example.message.get("properties", {}), example.message["headers"]
    unquoted, _ = headers.normalize(raw)
    from_raw = headers.decode_request(props, raw)
    from_unquoted = headers.decode_request(props, unquoted)
    assert from_raw.spec == from_unquoted.spec
    assert from_raw.spec.command == unquoted[headers.CMD]


@pytest.mark.parametrize("example", REPLIES, ids=_title)
def test_every_example_reply_decodes_as_a_reply(example: Example) -> None:
    update = headers.decode_reply(example.message["headers"], b"")
    unquoted, _ = headers.normalize(example.message["headers"])
    assert update.state is JobState(unquoted[headers.JOB_STATE])
    assert update.state.status == unquoted[headers.JOB_STATUS]
    assert update.is_final == (update.state is not JobState.RUNNING)


@pytest.mark.parametrize("example", REPLIES, ids=_title)
def test_every_example_reply_is_what_a_worker_sends_for_its_example_request(
        example: Example) -> None:
    props = example.message["properties"]
    request = _request(props["message_id"], correlation_id=props["correlation_id"])
    env = headers.envelope(request.get("properties", {}), request["headers"])
    unquoted, _ = headers.normalize(example.message["headers"])
    fields = {py: unquoted[wire] for py, wire in REPLY_FIELDS.items() if wire in unquoted}
    state = JobState(unquoted[headers.JOB_STATE])
    assert headers.reply_headers(state, env, **fields) == example.message["headers"]
    assert (props["message_id"], props["correlation_id"]) == (env.job_id, env.correlation_id)


def test_the_htcondor_style_request_is_unquoted_and_gets_quoted_replies() -> None:
    message = _request("4f0c2b9e-3d6a-4c1e-9a57-0e8b1f6d2c43")
    request = headers.decode_request(message["properties"], message["headers"])
    assert request.classad_quoted
    assert request.spec.command == "/bin/echo"
    assert request.spec.arguments == ("Hello", "Grid!")
    assert (request.spec.stdout, request.spec.requirements) == ("job.out", "TRUE")
    assert request.reply_to == ReplyAddress("amq.direct", "my_grid_results_key")


def test_the_string_only_request_describes_the_same_job_as_the_typed_one() -> None:
    typed = _decoded_spec(_request("job-2f9c1e7a", typed=True))
    strings = _decoded_spec(_request("job-2f9c1e7a", typed=False))
    assert strings == dataclasses.replace(typed, priority=0)


def test_the_job_file_describes_the_same_job_as_the_typed_request(tmp_path: Path) -> None:
    (example,) = JOBFILES
    for name in example.message["inputs"]:
        (tmp_path / name).write_text("input\n", encoding="utf-8")
    path = tmp_path / "histogram.json"
    path.write_text(json.dumps(example.message), encoding="utf-8")
    from_file = jobfile.spec_from_fields(jobfile.load(path), tmp_path)
    from_wire = _decoded_spec(_request("job-2f9c1e7a", typed=True))
    assert dataclasses.replace(from_file, inputs=(), job_id=from_wire.job_id) == from_wire


def test_the_dead_lettered_example_carries_the_reason_a_node_gives_for_its_request() -> None:
    (copy,) = [e.message for e in REQUESTS if _is_dead_letter(e.message)]
    original = _as_published(copy)
    props = original["properties"]
    node = Machine(cpus=8, memory_mb=16384, disk_mb=100_000, arch="X86_64", opsys="LINUX",
                   name=copy["headers"]["x-dispatch-rejected-by"], groups=("ssd",),
                   pools=("default",))
    env = headers.envelope(props, original["headers"])
    with pytest.raises(UnsatisfiableJobError) as caught:
        intake.admit(props, original["headers"], b"", env=env, slots=Slots(node),
                     machine_attrs=node.attributes())
    assert caught.value.reason == copy["headers"][headers.REASON]
    assert copy["headers"]["x-original-exchange"] == topology.jobs_exchange()
    (rejected,) = [e.message for e in REPLIES if e.message["headers"][headers.JOB_ID] == env.job_id]
    assert rejected["headers"][headers.REASON] == caught.value.reason


# ------------------------------------------------------------- the command line and Python

def _amqp_publish_options() -> tuple[dict[str, str], list[str], set[str]]:
    """Return the single-valued options, the -H values and the flags of the README's command."""
    (script,) = [body for _, body in _blocks("sh") if "amqp-publish" in body]
    words = shlex.split(script[script.index("amqp-publish"):].replace("\\\n", " "))
    single: dict[str, str] = {}
    header_values: list[str] = []
    flags: set[str] = set()
    rest = iter(words[1:])
    for word in rest:
        if word in ("-p", "--persistent"):
            flags.add(word)
        elif word == "-H":
            header_values.append(next(rest))
        elif word.startswith("-"):
            single[word] = next(rest)
    return single, header_values, flags


def test_the_amqp_publish_command_sends_the_string_only_request() -> None:
    single, header_values, flags = _amqp_publish_options()
    sent = {}
    for key, value in (v.split(":", 1) for v in header_values):
        sent[key] = value.lstrip(" ")
    message = _request("job-2f9c1e7a", typed=False)
    assert sent == message["headers"]
    assert (single["-e"], single["-r"]) == (topology.jobs_exchange(), "default")
    assert single["-t"] == message["properties"]["reply_to"]
    assert single["-C"] == message["properties"]["content_type"]
    assert "-p" in flags  # persistent: delivery_mode 2


class _FakeHandle:
    def updates(self, timeout_s: float | None = None) -> Iterator[Any]:
        return iter(())

    def wait(self, timeout_s: float | None = None) -> Any:
        return self

    def raise_for_rejection(self) -> None:
        pass

    exit_code = exit_signal = duration_s = None

    def extract(self, dest: str) -> None:
        pass


class _FakeClient:
    submitted: ClassVar[list[JobSpec]] = []

    def __init__(self, broker_url: str, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def submit(self, spec: JobSpec) -> _FakeHandle:
        self.submitted.append(spec)
        return _FakeHandle()


def test_the_python_example_submits_the_typed_request(monkeypatch: pytest.MonkeyPatch) -> None:
    ((_, code),) = _blocks("python")
    monkeypatch.setattr("dispatch.client.Client", _FakeClient)
    _FakeClient.submitted.clear()
    exec(compile(code, f"{README}:python", "exec"), {})
    (spec,) = _FakeClient.submitted
    sent = headers.decode_request({"message_id": spec.job_id, "priority": spec.priority},
                                  headers.encode_request(spec)).spec
    assert sent == _decoded_spec(_request("job-2f9c1e7a", typed=True))


# ------------------------------------------------------------------------ invalid messages

INVALID_HEADERS = [
    pytest.param({"Arguments": "hi"}, "Cmd", id="missing-Cmd"),
    pytest.param({"Cmd": "true", "RequestCpus": "abc"}, "RequestCpus", id="RequestCpus-abc"),
    pytest.param({"Cmd": "echo", "Arguments": 5}, "Arguments", id="Arguments-a-number"),
    pytest.param({"Cmd": "true", "Out": "../x"}, "Out", id="Out-escapes-the-directory"),
    pytest.param({"Cmd": "x" * 5000}, "Cmd", id="Cmd-oversized"),
]


@pytest.mark.parametrize(("raw", "field"), INVALID_HEADERS)
def test_an_invalid_request_is_refused_by_the_schema_naming_the_field(
        raw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidMessageError) as caught:
        schema.validate(schema.JOB_REQUEST, {"properties": {}, "headers": raw},
                        InvalidMessageError)
    assert caught.value.field == field
    assert caught.value.reason.startswith(f"{field}: ")


@pytest.mark.parametrize(("raw", "field"), INVALID_HEADERS)
def test_an_invalid_request_is_refused_by_the_codec_naming_the_same_field(
        raw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidMessageError) as caught:
        headers.decode_request({"message_id": "job-bad", "reply_to": "r"}, raw)
    assert caught.value.field == field


def test_a_classad_quoted_invalid_value_is_refused_once_unquoted() -> None:
    with pytest.raises(InvalidMessageError) as caught:
        headers.decode_request({}, {"Cmd": '"/bin/true"', "Out": '"../x"'})
    assert caught.value.field == "Out"


@pytest.mark.parametrize(("by_signal", "missing"), [(False, "ExitCode"), (True, "ExitSignal")])
def test_an_exited_reply_needs_an_exit_code_or_else_the_signal_that_ended_the_job(
        by_signal: bool, missing: str) -> None:
    reply = {"JobId": "j1", "JobStatus": 4, "JobState": "Exited", "RemoteHost": "n1",
             "ExitBySignal": by_signal, "JobDuration": 1.0}
    with pytest.raises(InvalidMessageError) as caught:
        schema.validate(schema.JOB_REPLY, {"headers": reply}, InvalidMessageError)
    assert caught.value.field == missing
