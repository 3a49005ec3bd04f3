"""The private RabbitMQ node that ``dispatch demo`` starts when no broker is reachable.

The node tests start real nodes from Debian's rabbitmq-server (about 5-7 s each), so there are
only three of them; the rest are fast.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import kombu
import pytest

from dispatch import localbroker
from dispatch.errors import BrokerUnreachableError
from dispatch.localbroker import PrivateBroker, broker_reachable, install_rabbitmq

NODE_TIMEOUT_S = 90


def port_is_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def harness_rabbitmq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """RABBITMQ_* variables like a test harness or a shell profile might leave behind."""
    monkeypatch.setenv("RABBITMQ_NODENAME", "rabbit@localhost")
    monkeypatch.setenv("RABBITMQ_NODE_PORT", "5672")
    monkeypatch.setenv("RABBITMQ_CONFIG_FILE", "/etc/rabbitmq/rabbitmq.conf")
    monkeypatch.setenv("RABBITMQ_ENABLED_PLUGINS_FILE", "/nonexistent/enabled_plugins")


@pytest.mark.timeout(NODE_TIMEOUT_S)
@pytest.mark.usefixtures("harness_rabbitmq_env")
def test_a_private_node_takes_a_message_and_leaves_no_port_or_data_dir_behind() -> None:
    broker = PrivateBroker().start()
    try:
        data_dir = broker.data_dir
        assert data_dir is not None and data_dir.is_dir()
        assert broker.port != 5672
        assert broker_reachable(broker.url)
        with kombu.Connection(broker.url) as connection:
            queue = kombu.Queue("localbroker.test", channel=connection.default_channel)
            queue.declare()
            connection.Producer().publish(
                {"hello": "node"}, routing_key="localbroker.test", serializer="json"
            )
            message = queue.get(no_ack=False, accept=["json"])
            assert message is not None
            assert message.decode() == {"hello": "node"}
            message.ack()
    finally:
        broker.stop()

    assert not port_is_open(broker.port)
    assert not broker_reachable(broker.url)
    assert not data_dir.exists()
    assert broker.data_dir is None


@pytest.mark.timeout(NODE_TIMEOUT_S)
def test_the_context_manager_stops_the_node_when_the_body_raises_and_stop_is_idempotent(
    tmp_path: Path,
) -> None:
    given_dir = tmp_path / "node"
    broker = PrivateBroker(given_dir)
    with pytest.raises(ZeroDivisionError), broker:
        assert port_is_open(broker.port)
        _ = 1 / 0

    assert not port_is_open(broker.port)
    broker.stop()
    broker.stop()
    assert given_dir.is_dir(), "a data dir the caller gave is the caller's to remove"
    assert (given_dir / "node.out").is_file()


@pytest.mark.timeout(NODE_TIMEOUT_S)
def test_a_node_that_cannot_listen_raises_with_the_tail_of_its_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        monkeypatch.setattr(localbroker, "_free_ports", lambda count: [taken_port, closed_port()])
        broker = PrivateBroker()
        with pytest.raises(BrokerUnreachableError, match="BOOT FAILED") as raised:
            broker.start()

    assert "could_not_start_listener" in str(raised.value)
    assert "eaddrinuse" in str(raised.value)
    assert broker.data_dir is None


def test_broker_reachable_is_false_for_a_closed_port() -> None:
    assert not broker_reachable(f"amqp://guest:guest@127.0.0.1:{closed_port()}//", timeout_s=0.5)


def test_broker_reachable_is_false_for_a_malformed_url() -> None:
    assert not broker_reachable("amqp://guest:guest@127.0.0.1:notaport//", timeout_s=0.5)


def test_install_rabbitmq_refuses_clearly_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localbroker.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(subprocess, "run", pytest.fail)

    with pytest.raises(BrokerUnreachableError, match="needs root") as raised:
        install_rabbitmq()
    assert "\n" not in str(raised.value)


def test_install_rabbitmq_refuses_clearly_without_apt_get(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localbroker.os, "geteuid", lambda: 0)
    monkeypatch.setattr(localbroker.shutil, "which", lambda name: None)
    monkeypatch.setattr(subprocess, "run", pytest.fail)

    with pytest.raises(BrokerUnreachableError, match="apt-get is missing"):
        install_rabbitmq()


def test_install_rabbitmq_reports_a_failing_apt_get_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(localbroker.os, "geteuid", lambda: 0)
    monkeypatch.setattr(localbroker.shutil, "which", lambda name: "/bin/false")

    with pytest.raises(
        BrokerUnreachableError, match=r"apt-get update failed with exit 1"
    ) as raised:
        install_rabbitmq()
    assert "\n" not in str(raised.value)
