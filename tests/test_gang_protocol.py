"""The multi-node job contract without a broker: headers, job files, tokens, notices, keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dispatch import gang, headers, jobfile
from dispatch.errors import InvalidJobFileError, InvalidMessageError
from dispatch.gang import Member
from dispatch.job import JobSpec, Nodes
from workers import gangkeys

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1c3kgYmVlcyBtYWtlIGhvbmV5IGFsbCBkYXkgbG9uZw"


def test_nodes_travel_as_headers_and_come_back_the_same():
    spec = JobSpec(command="/bin/sh", arguments=("-c", "mpirun ./a.out"),
                   nodes=Nodes(min=2, max=4, bootstrap="make", cleanup="cp x out/", gather_s=30))
    hdrs = headers.encode_request(spec)
    assert hdrs["MinNodes"] == 2 and hdrs["MaxNodes"] == 4 and hdrs["GatherTime"] == 30
    back = headers.decode_request({"message_id": "j1"}, hdrs)
    assert back.spec.nodes == spec.nodes
    assert headers.decode_request({"message_id": "j2"}, {"Cmd": "x"}).spec.nodes is None


def test_max_nodes_below_min_nodes_is_rejected_naming_max_nodes():
    with pytest.raises(InvalidMessageError) as info:
        headers.decode_request({"message_id": "j1"}, {"Cmd": "x", "MinNodes": 3, "MaxNodes": 2})
    assert info.value.field == "MaxNodes"


def test_string_headers_from_amqp_publish_give_the_same_nodes():
    raw = {"Cmd": "x", "MinNodes": "2", "MaxNodes": "3", "GatherTime": "5"}
    assert headers.decode_request({"message_id": "j1"}, raw).spec.nodes == Nodes(
        min=2, max=3, gather_s=5)


@pytest.mark.parametrize(("text", "field"), [
    ("nodes: {min: 3, max: 2}\nexecute: x\n", "nodes.max"),
    ("nodes: {min: 2, min_cpus: 4}\nrequirements: {cpus: 2}\nexecute: x\n", "nodes.min_cpus"),
    ("nodes: {min: 2, gather: soon}\nexecute: x\n", "nodes.gather"),
    ("execute: x\ncommand: y\n", "execute"),
    ("nodes: {min: 0}\nexecute: x\n", "nodes.min"),
])
def test_a_bad_multi_node_job_file_names_the_field(tmp_path: Path, text: str, field: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(InvalidJobFileError) as info:
        jobfile.spec_from_fields(jobfile.load(path), tmp_path)
    assert info.value.field == field, str(info.value)


def test_min_cpus_becomes_each_nodes_request_cpus(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("nodes: {min: 2, max: 3, min_cpus: 8}\nbootstrap: b\nexecute: e\n")
    spec = jobfile.spec_from_fields(jobfile.load(path), tmp_path)
    assert spec.resources.cpus == 8 and spec.command == "/bin/sh"
    assert spec.arguments == ("-c", "e") and spec.nodes == Nodes(min=2, max=3, bootstrap="b")


def _token(**changes: object) -> dict[str, object]:
    raw: dict[str, object] = {gang.GANG_OF: "j1", gang.GANG_INBOX: gang.inbox_queue("j1"),
                              gang.GANG_KEY: KEY, gang.GANG_HEAD: "n1", "RequestCpus": 2}
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


def test_a_token_is_read_and_a_bad_one_names_its_field():
    token = gang.read_token({"message_id": "j1.node2"}, _token())
    assert (token.job_id, token.token_id, token.head) == ("j1", "j1.node2", "n1")
    assert gang.is_token(_token()) and not gang.is_token({"Cmd": "x"})
    for changes, field in [({gang.GANG_KEY: "not a key"}, gang.GANG_KEY),
                           ({gang.GANG_INBOX: "amq.direct"}, gang.GANG_INBOX),
                           ({gang.GANG_HEAD: None}, gang.GANG_HEAD),
                           ({gang.GANG_OF: b"x" * 300}, gang.GANG_OF)]:
        with pytest.raises(InvalidMessageError) as info:
            gang.read_token({}, _token(**changes))
        assert info.value.field == field


def test_a_joined_notice_round_trips_and_garbage_is_refused():
    member = Member(node="n2", token_id="j1.node2", ssh_host="10.0.0.2", ssh_port=22,
                    ssh_user="mpi", host_key=KEY, cpus=4, workdir="/var/tmp/d/j1",
                    hold_queue=gang.hold_queue("j1", "n2"))
    assert Member.decode(member.encode()) == member
    for body in (b"", b"\x93\x01\x02\x03", b"\xa5hello"):
        with pytest.raises(InvalidMessageError):
            Member.decode(body)


def test_keys_are_added_and_removed_per_job_leaving_other_lines_alone(tmp_path: Path):
    path = tmp_path / "authorized_keys"
    path.write_text("ssh-ed25519 AAAAothers admin@example.org")  # no final newline
    private, public = gangkeys.new_key_pair("j1")
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    gangkeys.add_key(path, public, "j1")
    gangkeys.add_key(path, KEY + " comment", "j2")
    lines = path.read_text().splitlines()
    assert lines[0] == "ssh-ed25519 AAAAothers admin@example.org"
    assert lines[1] == f"restrict {public} {gang.KEY_COMMENT}j1"
    assert lines[2] == f"restrict {KEY} {gang.KEY_COMMENT}j2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert gangkeys.remove_keys(path, "j1") == 1
    assert gangkeys.remove_keys(path, "j1") == 0
    assert gangkeys.remove_keys(path) == 1  # what a node starting up does
    assert path.read_text() == "ssh-ed25519 AAAAothers admin@example.org\n"
    assert gangkeys.remove_keys(tmp_path / "missing") == 0


def test_the_hostfile_line_is_what_mpirun_reads():
    assert gang.hostfile_line("n2", 8) == "n2 slots=8\n"


@pytest.mark.parametrize("extra", [{"SourceUrl": "https://example.org/r.git"},
                                   {"SetupSteps": "make"}, {"In": "data.txt"}])
def test_a_multi_node_job_with_what_its_driver_does_not_run_is_rejected_naming_it(extra):
    with pytest.raises(InvalidMessageError) as info:
        headers.decode_request({"message_id": "j1"}, {"Cmd": "x", "MinNodes": 2, **extra})
    assert info.value.field == next(iter(extra))


def test_a_multi_node_job_file_with_a_source_is_a_one_line_error(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("nodes: {min: 2}\nexecute: x\nsetup: [make]\n")
    with pytest.raises(InvalidJobFileError) as info:
        jobfile.spec_from_fields(jobfile.load(path), tmp_path)
    assert info.value.field == "setup"
