"""Options: flags, environment fallbacks, defaults and one-line errors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.config import SETTINGS, EngineAddress, Options, parse_docker_host

DEFAULTS: dict[str, Any] = {
    "host": "0.0.0.0",
    "port": 9001,
    "cluster-addr": "",
    "advertise-addr": "",
    "secret": "",
    "secret-file": "",
    "secret-timeout": 259200.0,
    "pairing-reset": "",
    "tls-cert": "",
    "tls-key": "",
    "tls-ca": "",
    "log-level": LogLevel.info,
    "log-format": "text",
    "access-log": True,
    "relay": "bytes",
    "metrics-port": None,
    "data-path": "/data",
    "docker-host": EngineAddress("unix", path="/var/run/docker.sock"),
    "refresh-interval": 5.0,
    "fanout-timeout": 10.0,
    "connect-timeout": 5.0,
    "probe-failures": 3,
    "host-root": "",
    "dockerhub-auth-url": "https://auth.docker.io/token",
    "dockerhub-registry-url": "https://registry-1.docker.io",
}

# The TLS options name files that must exist (ConfigCase makes them), and go together:
# each needs the ones listed here to be set as well.
TLS_FILES = {"tls-cert": "agent.crt", "tls-key": "agent.key", "tls-ca": "ca.crt"}
COMPANIONS: dict[str, tuple[str, ...]] = {
    "tls-cert": ("tls-key",),
    "tls-key": ("tls-cert",),
    "tls-ca": ("tls-cert", "tls-key"),
}

# One good non-default value per option but the TLS files: (raw string, parsed value).
OTHER: dict[str, tuple[str, Any]] = {
    "host": ("::", "::"),
    "port": ("9443", 9443),
    "cluster-addr": ("_agent._tcp.example", "_agent._tcp.example"),
    "advertise-addr": ("10.1.2.3", "10.1.2.3"),
    "secret": ("s3cret", "s3cret"),
    "secret-timeout": ("1h30m", 5400.0),
    "pairing-reset": ("1764432000", "1764432000"),
    "log-level": ("DEBUG", LogLevel.debug),
    "log-format": ("JSON", "json"),
    "access-log": ("off", False),
    "relay": ("WEB", "web"),
    "metrics-port": ("9090", 9090),
    "data-path": ("/srv/agent", "/srv/agent"),
    "docker-host": ("tcp://10.0.0.7:2376", EngineAddress("tcp", host="10.0.0.7", port=2376)),
    "refresh-interval": ("0.5", 0.5),
    "fanout-timeout": ("2.5", 2.5),
    "connect-timeout": ("1", 1.0),
    "probe-failures": ("7", 7),
    "host-root": ("/host", "/host"),
    "dockerhub-auth-url": ("https://127.0.0.1:8443/token", "https://127.0.0.1:8443/token"),
    "dockerhub-registry-url": ("http://[::1]:5000", "http://[::1]:5000"),
}

# Values each option must refuse (secret and data-path take any string).
BAD: dict[str, list[str]] = {
    "host": ["localhost", "10.0.0", ""],
    "port": ["http", "0", "65536", "-1", "1.5"],
    "cluster-addr": ["tasks. agent", "a" * 254],
    "advertise-addr": ["node-1", "300.0.0.1"],
    "log-level": ["verbose", "trace", ""],
    "log-format": ["logfmt", ""],
    "access-log": ["yes", "0"],
    "relay": ["splice", ""],
    "metrics-port": ["http", "0", "65536", "9001"],
    "secret-timeout": ["", "soon", "-1", "72 h", "1d", "inf", "h"],
    "pairing-reset": ["two words", "new\n", "\t1", "é", "x" * 129],
    "docker-host": [
        "/var/run/docker.sock",
        "http://docker:2375",
        "unix://",
        "tcp://",
        "tcp://host:port",
        "tcp://host:70000",
        "unix://var/run/docker.sock",
    ],
    "refresh-interval": ["soon", "0", "-1", "inf", "nan"],
    "fanout-timeout": ["x", "0", "-5"],
    "connect-timeout": ["", "0"],
    "probe-failures": ["many", "0", "-2", "1.5"],
    "host-root": ["host", "./host"],
    "dockerhub-auth-url": ["auth.docker.io/token", "ftp://hub/token"],
    "dockerhub-registry-url": ["", "registry-1.docker.io"],
}

ENV = {s.flag: s.env for s in SETTINGS}
DEFAULTS_RAW = {s.flag: s.default for s in SETTINGS}


def parse(argv: list[str], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    options = Options(environ={} if environ is None else environ)
    options.parseOptions(argv)
    return dict(options)


class ConfigCase(SynchronousTestCase):
    """``self.other``: OTHER plus the TLS options, naming files made for the test."""

    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        self.other = dict(OTHER)
        for flag, name in TLS_FILES.items():
            path = folder / name
            path.write_text("-----BEGIN PLACEHOLDER-----\n")
            self.other[flag] = (str(path), str(path))

    def with_companions(self, flag: str) -> list[str]:
        """``flag`` and the options it needs set with it."""
        return [flag, *COMPANIONS.get(flag, ())]


class DefaultsTests(ConfigCase):
    def test_defaults(self) -> None:
        """No flags and no environment: every option at its documented default."""
        self.assertEqual(parse([]), DEFAULTS)

    def test_settings_cover_every_option(self) -> None:
        """The tables here name every option there is, so none goes untested."""
        self.assertEqual(set(ENV), set(DEFAULTS))
        # --secret-file changes --secret too: SecretFileTests has it.
        self.assertEqual(set(self.other) | {"secret-file"}, set(DEFAULTS))

    def test_process_environment_is_the_default_source(self) -> None:
        self.patch(os, "environ", {"AGENT_PORT": "9555"})
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["port"], 9555)


class SourceTests(ConfigCase):
    def test_each_flag(self) -> None:
        for flag in self.other:
            flags = self.with_companions(flag)
            with self.subTest(flag=flag):
                argv = [a for f in flags for a in (f"--{f}", self.other[f][0])]
                expected = {**DEFAULTS, **{f: self.other[f][1] for f in flags}}
                self.assertEqual(parse(argv), expected)

    def test_each_environment_variable(self) -> None:
        for flag in self.other:
            flags = self.with_companions(flag)
            with self.subTest(env=ENV[flag]):
                environ = {ENV[f]: self.other[f][0] for f in flags}
                expected = {**DEFAULTS, **{f: self.other[f][1] for f in flags}}
                self.assertEqual(parse([], environ), expected)

    def test_flag_wins_over_environment(self) -> None:
        environ = {ENV[flag]: raw for flag, (raw, _) in self.other.items()}
        argv = [f"--{flag}={DEFAULTS_RAW[flag]}" for flag in self.other]
        self.assertEqual(parse(argv, environ), DEFAULTS)

    def test_empty_flag_wins_over_environment(self) -> None:
        """An explicitly empty flag is a value, not an absence."""
        parsed = parse(["--cluster-addr="], {"AGENT_CLUSTER_ADDR": "tasks.agent"})
        self.assertEqual(parsed["cluster-addr"], "")

    def test_all_from_environment(self) -> None:
        environ = {ENV[flag]: raw for flag, (raw, _) in self.other.items()}
        self.assertEqual(
            parse([], environ),
            {"secret-file": "", **{flag: value for flag, (_, value) in self.other.items()}},
        )

    def test_unrelated_environment_ignored(self) -> None:
        self.assertEqual(parse([], {"PORT": "1", "HOST": "x", "AGENT_PORTS": "2"}), DEFAULTS)


class LogLevelTests(SynchronousTestCase):
    def test_any_case(self) -> None:
        for raw, level in [
            ("error", LogLevel.error),
            ("Warn", LogLevel.warn),
            ("warning", LogLevel.warn),
            ("iNfO", LogLevel.info),
            ("debug", LogLevel.debug),
        ]:
            with self.subTest(raw=raw):
                self.assertEqual(parse([], {"LOG_LEVEL": raw})["log-level"], level)
                self.assertEqual(parse(["--log-level", raw])["log-level"], level)


class PairingResetTests(SynchronousTestCase):
    def test_values_a_shell_makes(self) -> None:
        """$(date +%s), $(date -Iseconds), a word: all taken as given."""
        for raw in ["1764432000", "2026-11-29T18:04:12+00:00", "reinstall-2", "x" * 128]:
            with self.subTest(raw=raw):
                self.assertEqual(parse([], {"AGENT_PAIRING_RESET": raw})["pairing-reset"], raw)


class BadValueTests(SynchronousTestCase):
    def assertRefused(self, flag: str, raw: str, *, from_env: bool) -> None:
        argv, environ = ([], {ENV[flag]: raw}) if from_env else ([f"--{flag}={raw}"], {})
        with self.assertRaises(SystemExit) as caught:
            parse(argv, environ)
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("swarmagent: "), message)
        self.assertIn(f"--{flag}", message)
        self.assertIn(ENV[flag], message)

    def test_bad_flag_values(self) -> None:
        for flag, values in BAD.items():
            for raw in values:
                with self.subTest(flag=flag, raw=raw):
                    self.assertRefused(flag, raw, from_env=False)

    def test_bad_environment_values(self) -> None:
        for flag, values in BAD.items():
            for raw in values:
                with self.subTest(env=ENV[flag], raw=raw):
                    self.assertRefused(flag, raw, from_env=True)

    def test_message_names_the_option_at_fault_only(self) -> None:
        with self.assertRaises(SystemExit) as caught:
            parse(["--port", "99999"], {"AGENT_FANOUT_TIMEOUT": "0"})
        message = str(caught.exception.code)
        self.assertIn("--port / AGENT_PORT", message)
        self.assertIn("99999", message)

    def test_good_flag_overrides_bad_environment(self) -> None:
        self.assertEqual(parse(["--port", "9002"], {"AGENT_PORT": "nope"})["port"], 9002)


class SecretFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())

    def refused(self, argv: list[str], environ: Mapping[str, str]) -> str:
        with self.assertRaises(SystemExit) as caught:
            parse(argv, environ)
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertIn("--secret-file / AGENT_SECRET_FILE", message)
        return message

    def test_the_file_gives_the_secret(self) -> None:
        """A Docker secret written with a final newline: the newline is not part of it."""
        for content, secret in [("s3cret\n", "s3cret"), ("s3cret", "s3cret"), ("a b\r\n", "a b")]:
            self.path.write_text(content)
            for argv, environ in [
                ([f"--secret-file={self.path}"], {}),
                ([], {"AGENT_SECRET_FILE": str(self.path)}),
            ]:
                with self.subTest(content=content, argv=argv):
                    parsed = parse(argv, environ)
                    self.assertEqual(parsed["secret"], secret)
                    self.assertEqual(parsed["secret-file"], str(self.path))

    def test_not_both(self) -> None:
        self.path.write_text("one")
        message = self.refused([], {"AGENT_SECRET": "two", "AGENT_SECRET_FILE": str(self.path)})
        self.assertNotIn("one", message)
        self.assertNotIn("two", message)

    def test_missing_or_empty(self) -> None:
        self.assertIn("cannot read", self.refused([f"--secret-file={self.path}"], {}))
        self.path.write_text("\n")
        self.assertIn("is empty", self.refused([f"--secret-file={self.path}"], {}))


class TLSFileTests(ConfigCase):
    def refused(self, settings: Mapping[str, str], *, from_env: bool) -> str:
        argv = [] if from_env else [f"--{flag}={raw}" for flag, raw in settings.items()]
        environ = {ENV[flag]: raw for flag, raw in settings.items()} if from_env else {}
        with self.assertRaises(SystemExit) as caught:
            parse(argv, environ)
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("swarmagent: "), message)
        return message

    def test_cert_and_key_go_together(self) -> None:
        for flag in ("tls-cert", "tls-key"):
            for from_env in (False, True):
                with self.subTest(flag=flag, from_env=from_env):
                    message = self.refused({flag: self.other[flag][0]}, from_env=from_env)
                    self.assertIn("--tls-cert / AGENT_TLS_CERT", message)
                    self.assertIn("--tls-key", message)

    def test_ca_needs_a_certificate(self) -> None:
        for from_env in (False, True):
            with self.subTest(from_env=from_env):
                message = self.refused({"tls-ca": self.other["tls-ca"][0]}, from_env=from_env)
                self.assertIn("--tls-ca / AGENT_TLS_CA", message)

    def test_missing_files(self) -> None:
        for flag in TLS_FILES:
            settings = {f: self.other[f][0] for f in self.with_companions(flag)}
            settings[flag] = "/nonexistent/" + TLS_FILES[flag]
            for from_env in (False, True):
                with self.subTest(flag=flag, from_env=from_env):
                    message = self.refused(settings, from_env=from_env)
                    self.assertIn(f"--{flag} / {ENV[flag]}", message)
                    self.assertIn(repr(settings[flag]), message)
                    self.assertIn("no such file", message)


class DockerHostTests(SynchronousTestCase):
    def test_unix(self) -> None:
        self.assertEqual(
            parse_docker_host("unix:///run/user/1000/docker.sock"),
            EngineAddress("unix", path="/run/user/1000/docker.sock"),
        )

    def test_tcp(self) -> None:
        self.assertEqual(
            parse_docker_host("tcp://engine.local:2376"),
            EngineAddress("tcp", host="engine.local", port=2376),
        )

    def test_tcp_default_port(self) -> None:
        self.assertEqual(
            parse_docker_host("tcp://10.0.0.5"), EngineAddress("tcp", host="10.0.0.5", port=2375)
        )

    def test_tcp_ipv6(self) -> None:
        self.assertEqual(
            parse_docker_host("tcp://[fd00::5]:2375"),
            EngineAddress("tcp", host="fd00::5", port=2375),
        )

    def test_unix_with_a_host_part_is_refused(self) -> None:
        """``unix://var/run/docker.sock`` (two slashes) must not quietly
        become ``/run/docker.sock``: ``var`` would be read as a host."""
        with self.assertRaises(ValueError):
            parse_docker_host("unix://var/run/docker.sock")

    def test_refused(self) -> None:
        for value in ["", "docker.sock", "ssh://me@host", "tcp://:2375", "npipe:////./pipe/x"]:
            with self.subTest(value=value), self.assertRaises(ValueError) as caught:
                parse_docker_host(value)
            self.assertIn(repr(value), str(caught.exception))
