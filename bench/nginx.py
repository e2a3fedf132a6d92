"""nginx as a plain reverse proxy to an engine's unix socket, the baseline proxy."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.client import Target, fetch

CONFIG = """\
daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    upstream engine {{
        server unix:{socket};
        keepalive 64;
    }}
    server {{
        listen {host}:{port};
        listen {host}:{tls_port} ssl;
        ssl_certificate {tls}/server-cert.pem;
        ssl_certificate_key {tls}/server-key.pem;
        ssl_client_certificate {tls}/ca.pem;
        ssl_verify_client optional;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground in ``netns`` on ``host``: plain on ``port``, TLS on ``port+1``."""

    def __init__(self, socket: str, host: str, port: int, tls: str, netns: str = "") -> None:
        self.socket, self.host, self.port, self.tls, self.netns = socket, host, port, tls, netns
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("nginx") is not None

    @property
    def plain(self) -> Target:
        return Target("nginx", host=self.host, port=self.port)

    @property
    def secure(self) -> Target:
        return Target("nginx_tls", host=self.host, port=self.port + 1, tls=self.tls)

    def __enter__(self) -> Nginx:
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            CONFIG.format(
                tmp=self.tmp,
                socket=self.socket,
                host=self.host,
                port=self.port,
                tls_port=self.port + 1,
                tls=self.tls,
            )
        )
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        cmd = [*prefix, "nginx", "-p", str(self.tmp), "-c", str(conf)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=open(self.tmp / "stderr", "wb")
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if fetch(self.plain, "/_ping", 2)[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not start: " + (self.tmp / "stderr").read_text())
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)
