"""Service files: contrib/gateway.service (systemd), contrib/gateway.yaml (its config, also the Docker
image's), Dockerfile and .dockerignore.

No systemd runs here and no Docker daemon, so: the unit goes through `systemd-analyze verify` and
`systemd-analyze security --offline`, the Dockerfile through a structural check and an emulated build
context, and both start commands (the unit's ExecStart, the image's CMD) run for real against the
example config moved to a temporary directory and loopback ports, with the image's HEALTHCHECK
command asking the live gateway. `docker build` / `docker run` stay a manual check (README "Running
as a service").
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_config

from .dovecot import free_port

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "gateway.service"
EXAMPLE = ROOT / "contrib" / "gateway.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
STATE_DIR = "/var/lib/gateway"       # StateDirectory=gateway, the image's state volume
CONFIG_PATH = "/etc/gateway/gateway.yaml"
DEFAULT_PORTS = {2993, 2587, 3000}   # imap.listen, smtp.listen, api.listen


# --- parsing -------------------------------------------------------------------------------------

def unit_directives(text: str) -> dict[tuple[str, str], list[str]]:
    """{(section, key): [values in order]} of a systemd unit file (comments and blank lines dropped)."""
    directives: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        directives.setdefault((section, key.strip()), []).append(value.strip())
    return directives


def one(directives: dict[tuple[str, str], list[str]], key: str, section: str = "Service") -> str:
    values = directives.get((section, key))
    assert values is not None, f"{UNIT.name}: [{section}] {key}= is missing"
    assert len(values) == 1, f"{UNIT.name}: [{section}] {key}= is set {len(values)} times: {values}"
    return values[0]


def seconds(value: str) -> float:
    """A systemd time span in the forms used here: 30, 30s, 1min, 1min 30s."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|s|)\b", value):
        total += float(number) * (60 if unit == "min" else 1)
    assert total > 0, f"cannot read the time span {value!r}"
    return total


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            word, _, args = line.partition(" ")
            instructions.append((word.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD/HEALTHCHECK CMD: a shell form would hide signals from the process."""
    assert args.startswith("["), f"not the exec (JSON) form: {args!r}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck_command(instructions: list[tuple[str, str]]) -> list[str]:
    checks = [args for word, args in instructions if word == "HEALTHCHECK"]
    assert len(checks) == 1, f"expected one HEALTHCHECK, found {len(checks)}"
    _options, sep, command = checks[0].partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {checks[0]!r}"
    return exec_form(command.strip())


def docker_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in instructions:
        if word == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV in the key=value form, please: {args!r}"
                env[key] = value
    return env


def listener_ports(config: dict[str, Any]) -> set[int]:
    """Ports of every listener in a gateway.yaml mapping (imap, smtp, api)."""
    endpoints: list[str] = []
    for section, key in (("imap", "listen"), ("imap", "starttls_listen"), ("smtp", "listen"),
                         ("smtp", "implicit_tls_listen")):
        value = (config.get(section) or {}).get(key, [])
        endpoints += [value] if isinstance(value, str) else list(value)
    endpoints.append(config["api"]["listen"])
    ports = set()
    for endpoint in endpoints:
        parts = endpoint.split(":")
        if parts[0] == "haproxy":
            parts = parts[1:]
        ports.add(int(parts[1]))
    return ports


# --- (a) the systemd unit ------------------------------------------------------------------------

def real_twistd() -> str:
    """The twistd of the Python running the tests (the unit's /opt/gateway/bin/twistd does not exist here)."""
    beside = Path(sys.executable).with_name("twistd")
    found = str(beside) if beside.exists() else shutil.which("twistd")
    assert found, "twistd is not installed (pip install -e .)"
    return found


def unit_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit, with ExecStart's binary replaced by the real twistd, as <tmp>/gateway.service."""
    text = UNIT.read_text() if text is None else text
    assert "ExecStart=/opt/gateway/bin/twistd " in text
    copy = tmp_path / "gateway.service"
    copy.write_text(text.replace("ExecStart=/opt/gateway/bin/twistd ", f"ExecStart={real_twistd()} "))
    return copy


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd): the unit is not verified")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


def verify_complaints(unit: Path) -> list[str]:
    """What `systemd-analyze verify` says about the unit itself.

    Without a running systemd (a container) verify works offline; it exits 0 and prints nothing for a
    good unit, but an unknown key is only a warning on stderr with exit status 0, so the output is
    read, not just the status. Lines about other units (a distribution's own files) are not ours.
    """
    out = systemd_analyze("verify", "--man=no", str(unit))
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    ours = [line for line in lines if str(unit) in line or unit.name in line]
    if out.returncode != 0 and not ours:
        assert any(".service" in line or ".target" in line or ".socket" in line for line in lines), (
            f"systemd-analyze verify failed (status {out.returncode}) without naming a unit:\n"
            + "\n".join(lines))
    return ours


def test_systemd_analyze_verify_passes_for_the_unit(tmp_path):
    """`systemd-analyze verify` has nothing to say about the unit (ExecStart pointing at this
    machine's twistd: verify checks that the binary exists and is executable)."""
    assert verify_complaints(unit_copy(tmp_path)) == []


def test_the_verify_check_reports_a_misspelled_directive_and_a_missing_binary(tmp_path):
    """The check above can fail: a typo (only a warning, exit status 0) and an ExecStart binary that
    does not exist are both reported."""
    typo = unit_copy(tmp_path, UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    assert any("ProtectSytem" in line for line in verify_complaints(typo)), "a misspelled key went unnoticed"
    missing = tmp_path / "gone" / "gateway.service"
    missing.parent.mkdir()
    missing.write_text(UNIT.read_text().replace("/opt/gateway/bin/twistd", str(tmp_path / "no" / "twistd")))
    assert any("not executable" in line or "No such file" in line for line in verify_complaints(missing))


def test_unit_runs_twistd_in_the_foreground_as_a_dynamic_user_with_state_and_hardening():
    d = unit_directives(UNIT.read_text())
    required = {
        "Type": "exec",
        "DynamicUser": "yes",
        "StateDirectory": "gateway",
        "ConfigurationDirectory": "gateway",
        "Environment": f"GATEWAY_CONFIG={CONFIG_PATH}",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "WorkingDirectory": STATE_DIR,
        "UMask": "0077",
        # no capability at all: the default listeners are above 1024
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
    }
    wrong = {key: (d.get(("Service", key)), value) for key, value in required.items()
             if d.get(("Service", key)) != [value]}
    assert not wrong, f"{UNIT.name}: directives not as required (found, wanted): {wrong}"
    assert d[("Service", "SystemCallFilter")] == ["@system-service", "~@privileged"]
    families = set(one(d, "RestrictAddressFamilies").split())
    assert {"AF_INET", "AF_INET6"} <= families <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert "MemoryDenyWriteExecute" not in {key for _section, key in d}  # breaks pyOpenSSL's cffi callbacks
    assert one(d, "WantedBy", "Install") == "multi-user.target"
    assert "network-online.target" in one(d, "Wants", "Unit")

    argv = shlex.split(one(d, "ExecStart"))
    assert argv == ["/opt/gateway/bin/twistd", "--nodaemon", "--pidfile=", "gateway", "--config",
                    "${GATEWAY_CONFIG}"]

    # SIGTERM lets commands in flight finish for shutdown_grace seconds: systemd must wait longer.
    grace = load_config(str(EXAMPLE)).shutdown_grace
    assert seconds(one(d, "TimeoutStopSec")) > grace + 5

    # How to add the capability for a port below 1024 is written down where it is needed.
    text = UNIT.read_text()
    assert re.search(r"^#\s*AmbientCapabilities=CAP_NET_BIND_SERVICE$", text, re.M)
    assert re.search(r"^#\s*CapabilityBoundingSet=CAP_NET_BIND_SERVICE$", text, re.M)
    assert min(listener_ports(yaml.safe_load(EXAMPLE.read_text()))) >= 1024


def test_unit_exposure_level_stays_below_2(tmp_path):
    """`systemd-analyze security --offline` rates the unit's sandbox (0 = locked down, 10 = none):
    at most 2.0, the hardening cannot be dropped unnoticed (a unit without it rates 9.6)."""
    out = systemd_analyze("security", "--offline=yes", "--threshold=20", str(unit_copy(tmp_path)))
    level = re.search(r"Overall exposure level for gateway.service: ([\d.]+)", out.stdout)
    assert out.returncode == 0 and level, f"{out.stdout[-3000:]}\n{out.stderr}"
    assert float(level.group(1)) <= 2.0


# --- (b) the example configuration ---------------------------------------------------------------

def test_example_config_loads_and_keeps_every_file_in_the_state_directory():
    """contrib/gateway.yaml passes the gateway's own validation; the store, the secret key, the
    certificate and its key are absolute paths in the unit's StateDirectory (= the image's volume),
    so the CLI finds them from any directory and nothing is written beside the config."""
    config = load_config(str(EXAMPLE))
    d = unit_directives(UNIT.read_text())
    state = "/var/lib/" + one(d, "StateDirectory")
    assert state == STATE_DIR
    assert "/etc/" + one(d, "ConfigurationDirectory") + "/gateway.yaml" == CONFIG_PATH
    paths = {"store": config.store[len("sqlite:"):], "secret_key_file": config.secret_key_file,
             "tls.cert": config.tls.cert, "tls.key": config.tls.key}
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert raw["store"] == f"sqlite:{state}/gateway.db"
    for key, path in paths.items():
        assert path.startswith(state + "/"), f"{key}: {path} is not in {state}"
    assert raw["secret_key_file"].startswith("/") and raw["tls"]["cert"].startswith("/")
    assert config.api.listen == "tcp:3000:interface=127.0.0.1"  # the admin API stays on loopback
    assert listener_ports(raw) == DEFAULT_PORTS


# --- (c) the Dockerfile --------------------------------------------------------------------------

def test_dockerfile_structure():
    """What hadolint and a reviewer would look for (hadolint is not installable offline here)."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    words = [word for word, _args in instructions]

    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) == 1 and froms[0] in ("python:3.11-slim-bookworm", "debian:bookworm-slim"), froms

    runs = " ".join(args for word, args in instructions if word == "RUN")
    pip_installs = re.findall(r"pip3? install[^&;]*", runs)
    assert pip_installs and all("--no-cache-dir" in cmd for cmd in pip_installs), pip_installs

    assert "ADD" not in words  # COPY only: ADD fetches URLs and unpacks archives
    for word, args in instructions:
        if word == "COPY":
            for source in shlex.split(args)[:-1]:
                assert not re.search(r"\.(key|pem|crt|p12)$|secret|(^|/)(certs|var)(/|$)", source), (
                    f"COPY {source}: keys, certificates and state never go into the image")

    users = [(i, args) for i, (word, args) in enumerate(instructions) if word == "USER"]
    cmd_at = max(i for i, word in enumerate(words) if word == "CMD")
    assert users and users[-1][0] < cmd_at
    user = users[-1][1].split(":")[0]
    assert user not in ("root", "0"), "the gateway must not run as root"

    env = docker_env(instructions)
    assert env["GATEWAY_CONFIG"] == CONFIG_PATH
    copies = [shlex.split(args) for word, args in instructions if word == "COPY"]
    assert ["contrib/gateway.yaml", CONFIG_PATH] in copies  # the example config is the image's

    volumes: list[str] = []
    for word, args in instructions:
        if word == "VOLUME":
            volumes += exec_form(args) if args.startswith("[") else args.split()
    assert {"/etc/gateway", STATE_DIR} <= set(volumes)
    # What the gateway generates (store, secret key, CA, certificate) lands in the state volume.
    config = load_config(str(EXAMPLE))
    for path in (config.store[len("sqlite:"):], config.secret_key_file, config.tls.cert, config.tls.key):
        assert path.startswith(STATE_DIR + "/")

    exposed = {int(port.split("/")[0]) for word, args in instructions if word == "EXPOSE"
               for port in args.split()}
    assert exposed == DEFAULT_PORTS == listener_ports(yaml.safe_load(EXAMPLE.read_text()))

    assert ("STOPSIGNAL", "SIGTERM") in instructions
    cmd = exec_form([args for word, args in instructions if word == "CMD"][-1])
    assert cmd[0] == "twistd" and ("--nodaemon" in cmd or "-n" in cmd) and "--pidfile=" in cmd
    assert cmd[cmd.index("--pidfile=") + 1:] == ["gateway"]  # config from $GATEWAY_CONFIG

    check = healthcheck_command(instructions)
    assert check[0] == "python3"  # the slim image has no curl or wget
    assert "GATEWAY_HEALTH_URL" in check[-1]  # the URL comes from the image's ENV, checked here:
    health_url = env["GATEWAY_HEALTH_URL"]
    assert health_url == "http://127.0.0.1:3000/health"
    assert config.api.listen == "tcp:3000:interface=127.0.0.1"  # where that URL points

    ignored = dockerignore_patterns()
    for path in ("certs/gateway.key", "certs/gateway-ca.key", "certs/gateway.pem", "var/secret.key",
                 "var/gateway.db", "gateway/tls/leaked.key", "gateway/leaked.pem", "contrib/gateway.key",
                 "tests/integration/x.pem", ".git/config",
                 "twisted/plugins/dropin.cache", "gateway/__pycache__/tap.cpython-311.pyc"):
        assert docker_ignores(path, ignored), f".dockerignore lets {path} into the build context"


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def docker_ignores(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides;
    `!` re-includes. Patterns here: `*`, `**/x`, plain paths (enough for this .dockerignore)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        variants = [pattern] + ([pattern[3:]] if pattern.startswith("**/") else [])
        if any(fnmatch.fnmatchcase(prefix, variant) for prefix in prefixes for variant in variants):
            ignored = not negated
    return ignored


def test_docker_build_context_and_copies_give_a_complete_package(tmp_path):
    """The image's build, up to what needs Docker: the build context .dockerignore leaves, the COPY
    instructions into an image tree, then setuptools' build of the package there. Every module of
    gateway/ and the twistd plugin must reach the build (a subpackage missing from setup.cfg's
    `packages` would be missing from the image), and nothing else of the checkout."""
    patterns = dockerignore_patterns()
    context = tmp_path / "context"
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [name for name in dirnames if name != ".git"]
        for name in filenames:
            relative = (Path(dirpath) / name).relative_to(ROOT).as_posix()
            if not docker_ignores(relative, patterns):
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, context / relative)
    sent = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}
    assert not [p for p in sent if re.search(r"\.(key|pem)$|__pycache__|dropin\.cache", p)]
    assert {p.split("/")[0] for p in sent} == {"setup.py", "setup.cfg", "pyproject.toml", "README.md",
                                               "gateway", "twisted", "contrib"}

    image = tmp_path / "image"
    workdir = Path("/")
    for word, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "WORKDIR":
            workdir = workdir / args
        elif word == "COPY":
            *sources, dest = shlex.split(args)
            target = image / (workdir / dest).relative_to("/")
            for source in sources:
                assert (context / source).exists(), f"COPY {source}: not in the build context"
                if (context / source).is_dir():
                    shutil.copytree(context / source, target, dirs_exist_ok=True)
                elif dest.endswith("/") or len(sources) > 1:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(context / source, target / Path(source).name)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(context / source, target)
    assert (image / CONFIG_PATH.lstrip("/")).read_bytes() == EXAMPLE.read_bytes()

    src = image / "src"
    out = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "build")],
                         cwd=src, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    built = tmp_path / "build" / "lib"
    assert (built / "twisted" / "plugins" / "gateway_plugin.py").is_file()
    in_checkout = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*.py")}
    in_build = {p.relative_to(built).as_posix() for p in (built / "gateway").rglob("*.py")}
    assert in_checkout - in_build == set(), "modules left out of the image (setup.cfg packages?)"


# --- the start commands, for real ----------------------------------------------------------------

def adapted_config(workdir: Path) -> tuple[Path, Path, int]:
    """contrib/gateway.yaml with /var/lib/gateway moved to <workdir>/state and each listener moved to
    a free loopback port; everything else as shipped. Returns (config, state dir, API port)."""
    state, etc = workdir / "state", workdir / "etc"
    state.mkdir(mode=0o700)
    etc.mkdir()
    data = yaml.safe_load(EXAMPLE.read_text())

    def moved(path: str) -> str:
        assert path.startswith(STATE_DIR + "/"), path
        return str(state / path[len(STATE_DIR) + 1:])

    def loopback(endpoint: str) -> str:
        kind, _port, *options = endpoint.split(":")
        options = [o for o in options if not o.startswith("interface=")]
        return ":".join([kind, str(free_port()), *options, "interface=127.0.0.1"])

    data["store"] = "sqlite:" + moved(data["store"][len("sqlite:"):])
    data["secret_key_file"] = moved(data["secret_key_file"])
    data["tls"] = {key: moved(value) for key, value in data["tls"].items()}
    for section, key in (("imap", "listen"), ("imap", "starttls_listen"), ("smtp", "listen"),
                         ("smtp", "implicit_tls_listen")):
        if key in data.get(section, {}):
            data[section][key] = [loopback(e) for e in data[section][key]]
    data["api"]["listen"] = loopback(data["api"]["listen"])
    api_port = int(data["api"]["listen"].split(":")[1])
    config = etc / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    return config, state, api_port


def start_command(kind: str, config: Path) -> tuple[list[str], dict[str, str]]:
    """The unit's ExecStart or the image's CMD, with its environment pointing at ``config`` and the
    twistd program replaced by this Python's twistd."""
    env = dict(os.environ)
    if kind == "systemd":
        d = unit_directives(UNIT.read_text())
        key, _, value = one(d, "Environment").partition("=")
        assert (key, value) == ("GATEWAY_CONFIG", CONFIG_PATH)
        env[key] = str(config)
        # systemd substitutes ${VAR} from Environment= as one word
        argv = [env[word[2:-1]] if re.fullmatch(r"\$\{\w+\}", word) else word
                for word in shlex.split(one(d, "ExecStart"))]
        assert "$" not in " ".join(argv)
    else:
        instructions = dockerfile_instructions(DOCKERFILE.read_text())
        image_env = docker_env(instructions)
        assert image_env["GATEWAY_CONFIG"] == CONFIG_PATH
        env.update(image_env)
        env["GATEWAY_CONFIG"] = str(config)
        argv = exec_form([args for word, args in instructions if word == "CMD"][-1])
    assert Path(argv[0]).name == "twistd", argv
    return TWISTD + argv[1:], env


def health(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status
    except (OSError, urllib.error.HTTPError):
        return 0


@pytest.mark.parametrize("kind", ["systemd", "docker"])
def test_start_command_runs_the_example_config_and_the_healthcheck_sees_it(tmp_path, kind):
    """The unit's ExecStart / the image's CMD (twistd in the foreground, no pidfile, config from
    $GATEWAY_CONFIG) starts the gateway on the example config: the store, secret key, CA and
    certificate appear in the state directory and nothing beside the config; the CLI finds the
    same store from another directory by $GATEWAY_CONFIG alone (the README's `docker exec ...
    gateway token create` and root's `gateway token create`); the image's HEALTHCHECK command exits
    0 against it; SIGTERM stops it with status 0, after which the HEALTHCHECK exits 1."""
    config, state, api_port = adapted_config(tmp_path)
    argv, env = start_command(kind, config)
    log = tmp_path / "stdout"
    with open(log, "wb") as out, open(tmp_path / "stderr", "wb") as err:
        # cwd: the unit's WorkingDirectory=, the image's WORKDIR (both the state directory)
        proc = subprocess.Popen(argv, env=env, cwd=state, stdout=out, stderr=err)
    url = f"http://127.0.0.1:{api_port}/health"
    try:
        deadline = time.monotonic() + 30
        while health(url) != 200:
            assert proc.poll() is None, f"the gateway exited: {(tmp_path / 'stderr').read_text()}\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no /health answer after 30 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)

        made = {p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file()}
        assert {"gateway.db", "secret.key", "certs/gateway.pem", "certs/gateway.key",
                "certs/gateway-ca.pem", "certs/gateway-ca.key"} <= made, made
        for secret in ("secret.key", "certs/gateway.key", "certs/gateway-ca.key"):
            assert stat.S_IMODE((state / secret).stat().st_mode) == 0o600, secret
        assert [p.name for p in config.parent.iterdir()] == ["gateway.yaml"]
        assert not (state / "twistd.pid").exists()

        cli_env = {k: v for k, v in env.items() if k != "GATEWAY_CONFIG"}
        cli_env["GATEWAY_CONFIG"] = str(config)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        made_token = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "token", "create", "--scope", "api", "--description", "admin"],
            cwd=elsewhere, env=cli_env, capture_output=True, text=True, timeout=30)
        assert made_token.returncode == 0, made_token.stderr
        token = made_token.stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{64}", token)
        request = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/tokens",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as resp:  # the server knows the CLI's token
            assert resp.status == 200

        check = healthcheck_command(dockerfile_instructions(DOCKERFILE.read_text()))
        check_env = {**os.environ, "GATEWAY_HEALTH_URL": url}
        ran = subprocess.run([sys.executable, *check[1:]], env=check_env, capture_output=True, text=True,
                             timeout=10)
        assert ran.returncode == 0, ran.stderr

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - started < 15
        assert (state / "gateway.db").exists() and not (state / "gateway.db-wal").exists()

        down = subprocess.run([sys.executable, *check[1:]], env=check_env, capture_output=True, text=True,
                              timeout=10)
        assert down.returncode == 1, (down.returncode, down.stderr)  # 1 = unhealthy (2 is reserved)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
