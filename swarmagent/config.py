"""Command-line options, each with an environment-variable fallback."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.logger import LogLevel
from twisted.python import usage

LOG_LEVELS = {
    "ERROR": LogLevel.error,
    "WARN": LogLevel.warn,
    "WARNING": LogLevel.warn,
    "INFO": LogLevel.info,
    "DEBUG": LogLevel.debug,
}


@dataclass(frozen=True)
class Setting:
    """One option: its flag, its environment variable, its default and help."""

    flag: str
    env: str
    default: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "AGENT_HOST", "0.0.0.0", "Address to listen on."),
    Setting("port", "AGENT_PORT", "9001", "Port to listen on; peers are reached on it too."),
    Setting(
        "cluster-addr",
        "AGENT_CLUSTER_ADDR",
        "",
        "DNS name of the agents: SRV if it starts with '_', else A/AAAA. "
        "Default: tasks.<own service name>; none outside a swarm service.",
    ),
    Setting(
        "advertise-addr",
        "AGENT_ADVERTISE_ADDR",
        "",
        "Address peers reach this agent on. Default: learnt from DNS, else --host.",
    ),
    Setting("secret", "AGENT_SECRET", "", "Shared secret Portainer signs instead of the default."),
    Setting(
        "secret-file",
        "AGENT_SECRET_FILE",
        "",
        "File holding --secret, such as a Docker secret; its final newline is ignored.",
    ),
    Setting(
        "secret-timeout",
        "AGENT_SECRET_TIMEOUT",
        "72h",
        "How long an agent with no secret and no pairing lets a first Portainer key "
        "pair (like 72h, 30m, 1h30m or seconds); then none can until a restart. 0: always.",
    ),
    Setting(
        "pairing-reset",
        "AGENT_PAIRING_RESET",
        "",
        "Any new value (like a timestamp) forgets the paired Portainer key once, at start, "
        "and re-opens pairing; the same value again keeps the new pairing.",
    ),
    Setting(
        "tls-cert",
        "AGENT_TLS_CERT",
        "",
        "PEM certificate for the API. Default: a self-signed one made at start.",
    ),
    Setting("tls-key", "AGENT_TLS_KEY", "", "PEM private key of --tls-cert."),
    Setting(
        "tls-ca",
        "AGENT_TLS_CA",
        "",
        "PEM CA: clients with a certificate it signed need no signature; agents "
        "present --tls-cert to each other and verify each other against it.",
    ),
    Setting("log-level", "LOG_LEVEL", "INFO", "ERROR, WARN, INFO or DEBUG (any case)."),
    Setting(
        "log-format",
        "LOG_FORMAT",
        "text",
        "text (twistd's lines) or json (one JSON object per line).",
    ),
    Setting(
        "access-log",
        "AGENT_ACCESS_LOG",
        "on",
        "on or off: one INFO line per request (method, path without query, route, nodes, "
        "status, bytes, duration, client).",
    ),
    Setting(
        "relay",
        "AGENT_RELAY",
        "bytes",
        "bytes or web: who serves each client connection: the front door that relays plain "
        "Docker requests (this node's engine, another node's agent) as bytes and hands the "
        "rest to twisted.web, or twisted.web alone (docs/architecture.md).",
    ),
    Setting(
        "metrics-port",
        "AGENT_METRICS_PORT",
        "",
        "Also serve /metrics on this port, plain HTTP and without credentials, on --host. "
        "Default: only on the API port, behind its credentials.",
    ),
    Setting("data-path", "DATA_PATH", "/data", "Folder for state kept across restarts."),
    Setting(
        "docker-host",
        "DOCKER_HOST",
        "unix:///var/run/docker.sock",
        "Local engine: unix:///path or tcp://host:port.",
    ),
    Setting(
        "refresh-interval",
        "AGENT_REFRESH_INTERVAL",
        "5",
        "Seconds between DNS re-resolutions of the cluster address and peer probes.",
    ),
    Setting(
        "fanout-timeout",
        "AGENT_FANOUT_TIMEOUT",
        "10",
        "Seconds a cluster-wide list, or a container lookup, waits for any one node.",
    ),
    Setting(
        "connect-timeout",
        "AGENT_CONNECT_TIMEOUT",
        "5",
        "Seconds to open a connection to an engine or a peer.",
    ),
    Setting(
        "host-root",
        "AGENT_HOST_ROOT",
        "",
        "Where the host's root is mounted (like /host): enables Portainer's host browser "
        "and reads host info there. Default: no host browser, host info from /sys.",
    ),
    Setting(
        "dockerhub-auth-url",
        "AGENT_DOCKERHUB_AUTH_URL",
        "https://auth.docker.io/token",
        "Docker Hub's token service, for the pull rate-limit check.",
    ),
    Setting(
        "dockerhub-registry-url",
        "AGENT_DOCKERHUB_REGISTRY_URL",
        "https://registry-1.docker.io",
        "Docker Hub's registry, for the pull rate-limit check.",
    ),
    Setting(
        "probe-failures",
        "AGENT_PROBE_FAILURES",
        "3",
        "Failed identity probes in a row that remove a peer.",
    ),
)


@dataclass(frozen=True)
class EngineAddress:
    """Where the local Docker engine listens."""

    scheme: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0


def parse_docker_host(value: str) -> EngineAddress:
    """Parse ``unix:///path`` or ``tcp://host:port`` as DOCKER_HOST does."""
    parts = urlsplit(value)
    # unix://var/run/docker.sock would read "var" as a host and drop it.
    if parts.scheme == "unix" and parts.path and not parts.netloc:
        return EngineAddress("unix", path=parts.path)
    if parts.scheme == "tcp" and parts.hostname:
        try:
            port = parts.port or 2375
        except ValueError as e:
            raise ValueError(f"bad port in {value!r}") from e
        return EngineAddress("tcp", host=parts.hostname, port=port)
    raise ValueError(f"expected unix:///path or tcp://host:port, got {value!r}")


#: A pairing reset value: printable ASCII without spaces, as ``$(date +%s)`` gives.
_RESET_VALUE = re.compile(r"[!-~]{0,128}")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(value: str) -> float:
    """Seconds in ``72h``, ``1h30m``, ``90s`` or a plain number of seconds."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        m = _DURATION.fullmatch(text)
        if not text or m is None:
            raise ValueError(f"not a duration (like 72h, 30m, 1h30m, 90): {value!r}") from None
        hours, minutes, secs = (float(g) if g else 0.0 for g in m.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration (like 72h, 30m, 1h30m, 90): {value!r}")
    return seconds


def _positive(value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what} must be a number of seconds, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{what} must be more than 0, got {value!r}")
    return number


class Options(usage.Options):
    """``twistd swarmagent`` options; a flag wins over its environment variable."""

    optParameters = [
        [s.flag, None, None, f"{s.help} [env {s.env}, default {s.default!r}]"] for s in SETTINGS
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        for s in SETTINGS:
            if self[s.flag] is None:
                self[s.flag] = self.environ.get(s.env, s.default)
        try:
            self.validate()
        except ValueError as e:
            # twistd answers a UsageError with the whole help text; a bad
            # setting deserves one line that names it.
            raise SystemExit(f"swarmagent: {e}") from None

    def validate(self) -> None:
        """Turn the raw strings into typed values, naming the option at fault."""

        def bad(flag: str, why: str) -> ValueError:
            env = next(s.env for s in SETTINGS if s.flag == flag)
            return ValueError(f"--{flag} / {env}: {why}")

        try:
            ipaddress.ip_address(self["host"])
        except ValueError:
            raise bad("host", f"not an IP address: {self['host']!r}") from None
        if self["advertise-addr"]:
            try:
                ipaddress.ip_address(self["advertise-addr"])
            except ValueError:
                raise bad(
                    "advertise-addr", f"not an IP address: {self['advertise-addr']!r}"
                ) from None
        try:
            port = int(self["port"])
        except ValueError:
            raise bad("port", f"not a port number: {self['port']!r}") from None
        if not 1 <= port <= 65535:
            raise bad("port", f"must be 1-65535, got {port}")
        self["port"] = port
        level = LOG_LEVELS.get(str(self["log-level"]).upper())
        if level is None:
            raise bad(
                "log-level", f"must be one of ERROR, WARN, INFO, DEBUG; got {self['log-level']!r}"
            )
        self["log-level"] = level
        log_format = str(self["log-format"]).lower()
        if log_format not in ("text", "json"):
            raise bad("log-format", f"must be text or json; got {self['log-format']!r}")
        self["log-format"] = log_format
        access = str(self["access-log"]).lower()
        if access not in ("on", "off"):
            raise bad("access-log", f"must be on or off; got {self['access-log']!r}")
        self["access-log"] = access == "on"
        relay = str(self["relay"]).lower()
        if relay not in ("bytes", "web"):
            raise bad("relay", f"must be bytes or web; got {self['relay']!r}")
        self["relay"] = relay
        if self["metrics-port"]:
            try:
                metrics_port = int(self["metrics-port"])
            except ValueError:
                raise bad("metrics-port", f"not a port number: {self['metrics-port']!r}") from None
            if not 1 <= metrics_port <= 65535 or metrics_port == port:
                raise bad("metrics-port", f"must be 1-65535 and not --port, got {metrics_port}")
            self["metrics-port"] = metrics_port
        else:
            self["metrics-port"] = None
        try:
            self["docker-host"] = parse_docker_host(self["docker-host"])
        except ValueError as e:
            raise bad("docker-host", str(e)) from None
        try:
            self["secret-timeout"] = parse_duration(self["secret-timeout"])
        except ValueError as e:
            raise bad("secret-timeout", str(e)) from None
        if not _RESET_VALUE.fullmatch(self["pairing-reset"]):
            raise bad(
                "pairing-reset",
                "must be up to 128 printable ASCII characters without spaces "
                f"(like a timestamp), got {self['pairing-reset']!r}",
            )
        for flag in ("refresh-interval", "fanout-timeout", "connect-timeout"):
            try:
                self[flag] = _positive(self[flag], "value")
            except ValueError as e:
                raise bad(flag, str(e)) from None
        try:
            failures = int(self["probe-failures"])
        except ValueError:
            raise bad("probe-failures", f"not a whole number: {self['probe-failures']!r}") from None
        if failures < 1:
            raise bad("probe-failures", f"must be 1 or more, got {failures}")
        self["probe-failures"] = failures
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise bad("tls-cert", "--tls-cert and --tls-key go together")
        if self["tls-ca"] and not self["tls-cert"]:
            raise bad("tls-ca", "needs --tls-cert and --tls-key signed by that CA")
        for flag in ("tls-cert", "tls-key", "tls-ca"):
            if self[flag] and not os.path.isfile(self[flag]):
                raise bad(flag, f"no such file: {self[flag]!r}")
        if self["secret-file"]:
            self["secret"] = self._read_secret()
        root = self["host-root"]
        if root and not os.path.isabs(root):
            raise bad("host-root", f"not an absolute path: {root!r}")
        for flag in ("dockerhub-auth-url", "dockerhub-registry-url"):
            if urlsplit(self[flag]).scheme not in ("http", "https"):
                raise bad(flag, f"not an http(s) URL: {self[flag]!r}")
        name = self["cluster-addr"]
        if name and (len(name) > 253 or any(c.isspace() for c in name)):
            raise bad("cluster-addr", f"not a DNS name: {name!r}")

    def _read_secret(self) -> str:
        """``--secret`` from ``--secret-file``, which must not contradict it."""
        path = self["secret-file"]
        env = "--secret-file / AGENT_SECRET_FILE"
        if self["secret"]:
            raise ValueError(f"{env}: give the secret or a file holding it, not both")
        try:
            with open(path, encoding="utf-8") as f:
                secret = f.read().removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{env}: cannot read {path!r}: {e}") from None
        if not secret:
            raise ValueError(f"{env}: {path!r} is empty")
        return secret
