"""compose.yaml and deploy/: valid Compose, and nothing named in them that the project lacks.

No Docker engine runs here. The file is checked against the Compose Specification's JSON
Schema as shipped by Debian's docker-compose package (scripts/setup installs it), by that
package's own `docker-compose config`, and by `docker compose config` where the v2 plugin
exists. Every command is parsed by the real CLI it names (dispatch's click group, celery's),
every variable is in the one table of docs/operations.md with the default of
deploy/dispatch.env.example, and every DISPATCH_* variable handed to a container is read by
the code (or by the service's own command line). The "cluster" profile's three brokers and
deploy/compose.cluster.yaml, which points the Dispatch services at them, get the same checks.
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import jsonschema
import pytest
import yaml
from celery import Celery
from celery.bin.base import CLIContext
from celery.bin.celery import celery as celery_group
from cli_parse import parse
from flower.options import options as flower_options

from dispatch import broker, topology
from dispatch.config import VARIABLES as CLIENT
from workers.cloud.settings import VARIABLES as CLOUD

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
CLUSTER_OVERLAY = ROOT / "deploy" / "compose.cluster.yaml"
CLUSTER_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
ENV_EXAMPLE = ROOT / "deploy" / "dispatch.env.example"
OPERATIONS = ROOT / "docs" / "operations.md"
SPEC_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")
RABBIT_SCHEMAS = sorted(Path("/usr/lib/rabbitmq/lib").glob(
    "rabbitmq_server-*/plugins/*/priv/schema/*.schema"))

#: Variables the third-party images read, by image (they are not ours to check in code).
IMAGE_VARIABLES = {
    "rabbitmq": {"RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS", "RABBITMQ_ERLANG_COOKIE"},
    "postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
}
_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
                  r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


# -- reading the files ------------------------------------------------------------------

def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    """Return compose.yaml (or another compose file) as YAML reads it (anchors resolved)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def load_overlay() -> dict[str, Any]:
    """Return deploy/compose.cluster.yaml as YAML reads it."""
    return load_compose(CLUSTER_OVERLAY)


def env_example() -> dict[str, str]:
    """Return deploy/dispatch.env.example as NAME -> value."""
    pairs = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            assert name not in pairs, f"{name} twice in {ENV_EXAMPLE.name}"
            pairs[name.strip()] = value.strip()
    return pairs


def documented() -> dict[str, tuple[str, str]]:
    """Return the variables table of docs/operations.md as NAME -> ('read by', 'default')."""
    rows = {}
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0]) if len(cells) >= 4 else None
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} twice in the table"
            rows[match.group(1)] = (cells[1], cells[2])
    return rows


def references(value: Any) -> list[tuple[str, str | None, str]]:
    """Return every ${NAME[op]arg} in the strings of ``value`` as (name, op, arg)."""
    found: list[tuple[str, str | None, str]] = []
    if isinstance(value, dict):
        for item in value.values():
            found += references(item)
    elif isinstance(value, list):
        for item in value:
            found += references(item)
    elif isinstance(value, str):
        for match in _VAR.finditer(value.replace("$$", "")):
            name = match.group("braced") or match.group("plain")
            found.append((name, match.group("op"), match.group("arg") or ""))
    return found


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Interpolate as Compose does: ${V}, ${V:-d}, ${V-d}, ${V:?e}, ${V?e}, $V, and $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain")
        op, arg, current = match.group("op"), match.group("arg"), env.get(name)
        if op in (":-", "-"):
            return arg if current is None or (op == ":-" and not current) else current
        if op in (":?", "?") and (current is None or (op == ":?" and not current)):
            raise KeyError(f"{name}: {arg}")
        return current or ""

    parts = value.split("$$")
    return "$".join(_VAR.sub(one, part) for part in parts)


def example_env(**overrides: str) -> dict[str, str]:
    """The example settings with the passwords filled in, as an operator's .env would be."""
    env = {k: v or (f"pw-{k.lower()}" if k.endswith("PASSWORD") else v)
           for k, v in env_example().items()}
    return {**env, **overrides}


def container_argv(service: dict[str, Any], env: dict[str, str]) -> list[str]:
    """Return the argv a service's container runs, after sh -c expansion if it uses sh."""
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] != ["sh", "-c"]:
        return argv
    script = _VAR.sub(lambda m: shlex.quote(env.get(m.group("braced") or m.group("plain"), ""))
                      if m.group(0).startswith("${") else env.get(m.group("plain"), ""),
                      argv[2])
    words = shlex.split(script)
    assert words[0] == "exec", f"sh -c scripts exec their program: {argv[2]}"
    return words[1:]


# -- the Compose Specification ----------------------------------------------------------

@pytest.fixture(scope="module")
def spec() -> jsonschema.Draft201909Validator:
    assert SPEC_SCHEMA.is_file(), "the Compose Specification's schema comes with Debian's " \
                                  "docker-compose package: run scripts/setup"
    schema = json.loads(SPEC_SCHEMA.read_text(encoding="utf-8"))
    assert "2019-09" in schema["$schema"]  # spelt http://...# there, which jsonschema misses
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_yaml_matches_the_compose_specification_as_written_and_interpolated(spec):
    raw = load_compose()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in spec.iter_errors(raw)]
    assert errors == []
    resolved = interpolate(raw, example_env())
    assert [e.message for e in spec.iter_errors(resolved)] == []


@pytest.mark.parametrize(("path", "value"), [
    (("services", "worker", "comand"), ["dispatch", "worker"]),
    (("services", "rabbitmq", "healthcheck", "intervall"), "10s"),
    (("services", "ledger", "depends_on", "postgres", "condition"), "service_happy"),
])
def test_the_schema_check_catches_a_misspelt_key_or_value(spec, path, value):
    broken = copy.deepcopy(load_compose())
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert list(spec.iter_errors(broken))


def _compose_clis() -> list[list[str]]:
    found = []
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


def _compose_config(cli: list[str], env_file: Path, *args: str) -> dict[str, dict[str, Any]]:
    """Return the services ``config`` prints for compose.yaml (and ``args``), or fail."""
    done = subprocess.run([*cli, "-f", str(COMPOSE), *args, "--env-file", str(env_file),
                           "config"], capture_output=True, text=True, timeout=60, check=False,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    # The output is a compose file again: `$$` stays escaped until it is read.
    services = interpolate(yaml.safe_load(done.stdout)["services"], {})
    assert isinstance(services, dict)
    return services


def _example_env_file(tmp_path: Path) -> Path:
    env_file = tmp_path / "site.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in example_env().items()))
    return env_file


def test_docker_compose_config_accepts_the_file_with_the_example_settings(tmp_path):
    clis = _compose_clis()
    assert clis, "no docker-compose here: run scripts/setup (Debian's docker-compose package)"
    env_file = _example_env_file(tmp_path)
    for cli in clis:
        services = _compose_config(cli, env_file, "--profile", "cloud", "--profile", "cluster")
        assert set(services) == set(load_compose()["services"])
        ours = interpolate(load_compose(), example_env())["services"]
        for name, service in services.items():
            assert service["environment"] == ours[name]["environment"], name
            assert service.get("command") == ours[name].get("command"), name


def test_docker_compose_config_refuses_to_run_without_the_passwords(tmp_path):
    env_file = tmp_path / "site.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_example().items()))
    for cli in _compose_clis():
        done = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
                              capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
        assert done.returncode != 0
        assert "set DISPATCH_" in done.stderr and "_PASSWORD" in done.stderr


# -- the cluster profile ----------------------------------------------------------------

def test_the_cluster_brokers_exist_only_in_the_cluster_profile():
    services = load_compose()["services"]
    in_profile = {name for name, service in services.items()
                  if "cluster" in service.get("profiles", [])}
    assert in_profile == set(CLUSTER_NODES)
    for name in CLUSTER_NODES:
        assert services[name]["profiles"] == ["cluster"], name
    # Nothing outside the profile waits for a cluster node (it would start it).
    for name, service in services.items():
        if name not in in_profile:
            assert not set(service.get("depends_on", {})) & in_profile, name


def test_each_cluster_broker_has_a_fixed_node_name_its_own_data_and_the_shared_cookie():
    services = _services()
    names = {f"rabbit@{services[n]['hostname']}" for n in CLUSTER_NODES}
    listed = _broker_settings(ROOT / example_env()["DISPATCH_RABBITMQ_CLUSTER_CONF"],
                              prefix="cluster_formation.classic_config.nodes.")
    assert names == set(listed.values())
    data = set()
    for name in CLUSTER_NODES:
        node = services[name]
        assert node["hostname"] == name
        assert node["environment"]["RABBITMQ_ERLANG_COOKIE"] == example_env()[
            "DISPATCH_ERLANG_COOKIE"]
        targets = {v.split(":")[1]: v.split(":")[0] for v in node["volumes"]}
        assert targets["/etc/rabbitmq/conf.d/30-cluster.conf"] == "./deploy/rabbitmq-cluster.conf"
        assert targets["/etc/rabbitmq/conf.d/20-dispatch.conf"] == "./deploy/rabbitmq.conf"
        data.add(targets["/var/lib/rabbitmq"])
        assert node["healthcheck"] == services["rabbitmq"]["healthcheck"]
    assert len(data) == 3 and services["rabbitmq-1"].get("depends_on") is None
    for name in CLUSTER_NODES[1:]:  # they join rabbitmq-1 once it has formed the cluster
        assert services[name]["depends_on"] == {"rabbitmq-1": {"condition": "service_healthy"}}


def test_docker_compose_config_accepts_the_cluster_profile_and_its_overlay(tmp_path):
    clis = _compose_clis()
    assert clis, "no docker-compose here: run scripts/setup (Debian's docker-compose package)"
    env_file = _example_env_file(tmp_path)
    ours = _services()
    for cli in clis:
        services = _compose_config(cli, env_file, "--profile", "cluster")
        assert set(CLUSTER_NODES) <= set(services)
        assert services["worker"]["environment"] == ours["worker"]["environment"]
        merged = _compose_config(cli, env_file, "-f", str(CLUSTER_OVERLAY),
                                 "--profile", "cluster")
        assert set(merged) == set(services)  # the overlay adds no service
        for name in ("worker", "ledger", "flower-feed", "flower"):
            env = merged[name]["environment"]
            urls = broker.cluster_urls(env["DISPATCH_BROKER_URL"])
            assert [urlsplit(u).hostname for u in urls] == list(CLUSTER_NODES), name
            assert {urlsplit(u).password for u in urls} == {
                example_env()["DISPATCH_RABBITMQ_PASSWORD"]}, name
            assert set(CLUSTER_NODES) <= set(merged[name]["depends_on"]), name
            assert merged[name].get("command") == ours[name].get("command"), name
            if name != "flower":
                assert env["DISPATCH_QUEUE_TYPE"] == topology.QUORUM, name
        assert "@rabbitmq-1:15672/" in merged["flower"]["environment"]["FLOWER_BROKER_API"]


def test_the_cluster_overlay_matches_the_specification_and_only_changes_existing_services(spec):
    overlay = load_overlay()
    assert [e.message for e in spec.iter_errors(overlay)] == []
    assert [e.message for e in spec.iter_errors(interpolate(overlay, example_env()))] == []
    assert set(overlay["services"]) <= set(load_compose()["services"])  # no misspelt name


# -- commands ---------------------------------------------------------------------------

def _services(env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    return interpolate(load_compose(), env or example_env())["services"]


@pytest.mark.parametrize("worker_args", ["", "--slots 4 --memory 8G --group ssd --group gpu"])
def test_every_dispatch_command_in_compose_parses_with_the_real_cli(worker_args):
    env = example_env(DISPATCH_WORKER_ARGS=worker_args, HOSTNAME="3f2a9c1b7d4e")
    ran = {}
    for name, service in _services(env).items():
        if "command" not in service:
            continue
        argv = container_argv(service, {**env, **service.get("environment", {})})
        if argv[0] == "dispatch":
            ran[name] = parse(argv[1:])
    assert {name: p.verbs for name, p in ran.items()} == {
        "worker": ("worker",), "ledger": ("ledger",), "flower-feed": ("flower-feed",)}
    assert ran["worker"].params["name"] == "3f2a9c1b7d4e"
    assert ran["worker"].params["pools"] == ("default",)
    if worker_args:
        assert ran["worker"].params["slots"] == 4
        assert ran["worker"].params["groups"] == ("ssd", "gpu")
    assert ran["ledger"].params["pools"] == ("default",)


def test_a_misspelt_option_in_a_compose_command_would_be_caught():
    service = copy.deepcopy(_services()["ledger"])
    service["command"] = [*service["command"], "--lease-check", "5"]
    with pytest.raises(click.UsageError):
        parse(container_argv(service, {})[1:])


def test_celery_commands_name_the_cloud_app_and_real_celery_subcommands():

    seen = set()
    for name, service in _services().items():
        argv = container_argv(service, service.get("environment", {})) \
            if "command" in service else []
        if not argv or argv[0] != "celery":
            continue
        assert argv[1] == "-A", name
        app = importlib.import_module(argv[2]).app
        assert isinstance(app, Celery), argv[2]
        verb, args = argv[3], argv[4:]
        seen.add(verb)
        parent = celery_group.make_context("celery", argv[1:4],
                                           obj=CLIContext(app=app, no_color=True, workdir=None,
                                                          quiet=True))
        sub = celery_group.get_command(parent, verb)
        assert sub is not None, f"{name}: celery has no command {verb}"
        if verb == "flower":  # flower passes its arguments to tornado's option parser
            for arg in args:
                assert arg.startswith("--") and arg[2:].split("=")[0] in flower_options, arg
        else:
            sub.make_context(verb, args, parent=parent)
    assert seen == {"worker", "beat", "flower"}


def test_flower_settings_are_options_flower_reads():

    flower = load_compose()["services"]["flower"]
    names = [k for k in flower["environment"] if k.startswith("FLOWER_")]
    assert names
    for name in names:
        assert name.removeprefix("FLOWER_").lower() in flower_options, name


# -- variables --------------------------------------------------------------------------

def _read_by_code() -> set[str]:
    """String constants of dispatch/ and workers/, less the VARIABLES tables themselves."""
    found: set[str] = set()
    for path in [*ROOT.glob("dispatch/**/*.py"), *ROOT.glob("workers/**/*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "VARIABLES" for t in node.targets)
                and isinstance(node.value, ast.Dict) for k in node.value.keys}
        found |= {n.value for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip}
    return found


def test_every_variable_compose_reads_is_in_the_table_and_the_example_with_its_default():
    refs = references(load_compose()) + references(load_overlay())
    names = {name for name, _, _ in refs}
    example, table = env_example(), documented()
    assert names == set(example), "compose.yaml and deploy/dispatch.env.example differ"
    assert names <= set(table), f"not in docs/operations.md: {sorted(names - set(table))}"
    for name, op, arg in refs:
        default = table[name][1]
        if op == ":-":
            assert example[name] == arg, f"{name}: compose says {arg!r}, example {example[name]!r}"
            assert default == (f"`{arg}`" if arg else "empty"), f"{name}: the table says {default}"
        elif op == ":?":
            assert example[name] == "", f"{name} is a secret: leave it empty in the example"
            assert default == "required", f"{name}: the table says {default}"
        else:
            pytest.fail(f"{name}: give it a default (:-) or make it required (:?)")


def test_every_dispatch_variable_handed_to_a_container_is_read_by_the_code_or_its_command():
    code = _read_by_code()
    raw = load_compose()["services"]
    overlay = load_overlay()["services"]
    for name, service in [*raw.items(), *overlay.items()]:
        image = raw[name]["image"].split("${")[-1].split(":-")[-1].split(":")[0].split("/")[-1]
        command = " ".join(service.get("command", [])) if isinstance(
            service.get("command"), list) else service.get("command", "")
        for var in service.get("environment", {}):
            if var.startswith("DISPATCH_"):
                assert var in code or f"$${var}" in command, f"{name}: {var} is read by nobody"
            elif var.startswith("FLOWER_"):
                continue  # test_flower_settings_are_options_flower_reads
            else:
                assert var in IMAGE_VARIABLES.get(image, set()), f"{name}: {var} ({image})"


#: What only ``dispatch worker`` reads from its environment.
WORKER = {"DISPATCH_NODE_HEARTBEAT_S", "DISPATCH_CGROUP_ROOT", "DISPATCH_JOB_PIDS_MAX",
          "DISPATCH_MODULES_DIR", "DISPATCH_SSH_HOSTS", "DISPATCH_RUNNING_AFTER_S"}


def test_the_table_lists_what_the_code_reads_and_nothing_that_nothing_reads():
    table, code = documented(), _read_by_code()

    assert set(CLIENT) <= set(table), sorted(set(CLIENT) - set(table))
    compose_names = {name for name, _, _ in references(load_compose())}
    for name, (read_by, _) in table.items():
        if "compose" in read_by:
            assert name in compose_names, f"{name}: the table says compose reads it"
        if "code" in read_by:
            assert name in code and (name in CLIENT or name in CLOUD or name in WORKER
                                     or name.startswith("DISPATCH_SMTP")), name
        assert "compose" in read_by or "code" in read_by or "rabbitmqctl" in read_by, name


# -- deploy/ ----------------------------------------------------------------------------

def test_the_files_compose_mounts_and_builds_from_exist():
    example = env_example()
    for key in ("DISPATCH_RABBITMQ_CONF", "DISPATCH_RABBITMQ_CLUSTER_CONF",
                "DISPATCH_RABBITMQ_ADVANCED_CONF"):
        assert (ROOT / example[key]).is_file(), key
    build = load_compose()["services"]["worker"]["build"]
    dockerfile = ROOT / build["context"] / build["dockerfile"]
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / build["context"] / source).exists(), source


def _schema_mappings() -> dict[str, str]:
    mappings = {}
    for path in RABBIT_SCHEMAS:
        text = path.read_text(encoding="utf-8", errors="replace")
        for key, rest in re.findall(r'\{mapping,\s*"([^"]+)",\s*"[^"]+",\s*\[(.*?)\]\}', text,
                                    flags=re.S):
            mappings[key] = rest
    return mappings


def _schema_mapping(mappings: dict[str, str], key: str) -> str | None:
    """Return the schema mapping of ``key``; ``$name`` segments of a mapping match any."""
    if key in mappings:
        return mappings[key]
    parts = key.split(".")
    for name, rest in mappings.items():
        pattern = name.split(".")
        if len(pattern) == len(parts) and all(
                p == k or p.startswith("$") for p, k in zip(pattern, parts, strict=True)):
            return rest
    return None


def _broker_settings(path: Path, prefix: str = "") -> dict[str, str]:
    """Return the settings of a rabbitmq.conf file (those starting with ``prefix``),
    failing on any key RabbitMQ's schema lacks or any value not of its type."""
    assert RABBIT_SCHEMAS, "RabbitMQ is not installed: run scripts/setup"
    mappings = _schema_mappings()
    settings = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = (part.strip() for part in line.partition("="))
            mapping = _schema_mapping(mappings, key)
            assert mapping is not None, f"RabbitMQ has no setting {key}"
            if "{datatype, integer}" in mapping:
                assert value.isdigit(), f"{key} = {value} is not an integer"
            enum = re.search(r"\{datatype,\s*\{enum,\s*\[([^\]]*)", mapping)
            if enum:
                assert value in re.split(r",\s*", enum.group(1)), f"{key} = {value}"
            assert key not in settings, f"{key} twice in {path.name}"
            if key.startswith(prefix):
                settings[key] = value
    return settings


def test_the_broker_config_sets_only_keys_rabbitmq_knows_with_values_of_their_type():
    settings = _broker_settings(ROOT / "deploy" / "rabbitmq.conf")
    assert int(settings["consumer_timeout"]) >= 3600 * 1000
    assert int(settings["max_message_size"]) <= 512 * 1024 * 1024  # the broker's own limit
    assert settings["management.tcp.port"] == "15672"


def test_the_cluster_config_sets_only_keys_rabbitmq_knows_and_names_the_three_nodes():
    settings = _broker_settings(ROOT / "deploy" / "rabbitmq-cluster.conf")
    assert settings.pop("cluster_formation.peer_discovery_backend") == "classic_config"
    assert settings.pop("cluster_partition_handling") == "pause_minority"
    assert settings == {f"cluster_formation.classic_config.nodes.{i}": f"rabbit@{name}"
                        for i, name in enumerate(CLUSTER_NODES, start=1)}


@pytest.mark.parametrize(("line", "error"), [
    ("cluster_formation.classic_config.nodez.1 = rabbit@x", "RabbitMQ has no setting"),
    ("cluster_partition_handling = pause_majority", "cluster_partition_handling"),
    ("default_queue_type = quorum", "RabbitMQ has no setting"),  # 3.13.x only: see the file
])
def test_the_broker_config_check_catches_a_misspelt_key_or_value(tmp_path, line, error):
    conf = tmp_path / "broken.conf"
    conf.write_text(f"{line}\n")
    with pytest.raises(AssertionError, match=error):
        _broker_settings(conf)


def test_advanced_config_is_a_term_file_the_broker_can_read():
    erl = shutil.which("erl")
    assert erl, "Erlang comes with rabbitmq-server: run scripts/setup"
    done = subprocess.run([erl, "-noshell", "-eval",
                           '{ok, [T]} = file:consult("deploy/advanced.config"), '
                           'io:format("~p", [proplists:get_value(rabbit, T)]), halt().'],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert "channel_tick_interval" in done.stdout


def test_the_broker_healthcheck_passes_on_a_running_broker(rabbitmq_proc):
    test = load_compose()["services"]["rabbitmq"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "rabbitmq-diagnostics"
    tool = Path(rabbitmq_proc.rabbit_ctl).with_name("rabbitmq-diagnostics")
    done = subprocess.run([str(tool), *test[2:]], capture_output=True, text=True, timeout=60,
                          check=False, env=rabbitmq_proc._popen_kwargs["env"])
    assert done.returncode == 0, done.stderr
