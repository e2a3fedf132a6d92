"""``python -m bench.fuzz [--budget S] [--examples N]``: an HTTP fuzzer on a real agent.

Hypothesis builds raw requests (request lines, headers of every size and
shape, chunked and sized bodies, the Portainer signature, target and
broadcast headers, WebSocket upgrade heads, the agent's own routes) and sends
each over a real TLS socket to a real agent on a 2-node lab swarm (tests/lab.py;
run as root, with ``SALAB_ID`` set). Each input is *complete* (its head ends,
its body is as long as its framing says, or the framing is unreadable), so the
agent owes it an answer. The oracle, for every input:

- an HTTP status line or a closed connection within :data:`BOUND` seconds
  (a hang is a finding: the agent would only let go at its idle timeout);
- no 500 of the agent's own (an engine's 500, marked ``Api-Version``, is the
  engine's to give);
- ``/ping`` on another connection answers 204 right after;
- no new ``Unhandled`` or ``Traceback`` in either agent's log.

The first input that breaks a rule is shrunk by Hypothesis and printed;
the exit status is 1. ``--json FILE`` writes the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import signal
import socket
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from swarmagent.signature import PUBLIC_KEY_HEADER, SIGNATURE_HEADER, Signer
from swarmagent.wire import BROADCAST, MANAGER_OPERATION, TARGET
from tests.lab import AGENT_PORT, Agent, Lab, wait_until

#: Seconds an input may take to be answered or closed: the slowest honest
#: answer is a fan-out or engine call (3 s and 10 s deadlines in the lab),
#: far below the agent's 120 s idle timeout.
BOUND = 15.0
#: Seconds a sized answer's body is waited for after its head.
BODY_GRACE = 2.0
#: Seconds Hypothesis may go on shrinking a finding after the budget.
SHRINK_GRACE = 120.0
#: What a log line must not hold.
LOG_ALARMS = (b"Unhandled", b"Traceback")
#: An object no engine holds (a write to it is harmless).
NONE = "fuzz-none"

# --- what the inputs are made of ---------------------------------------------------------

#: Paths of the agent's routes and of the Docker API it relays. Only
#: reads; writes name objects that do not exist (see :func:`_method_path`).
READ_PATHS = [
    "/ping",
    "/v2/ping",
    "/_ping",
    "/agents",
    "/v2/agents",
    "/info",
    "/version",
    "/containers/json",
    "/containers/json?all=1&filters=%7B%22node%22%3A%5B%22node2%22%5D%7D",
    "/images/json",
    "/volumes",
    "/networks",
    "/services",
    "/nodes",
    "/tasks",
    "/system/df",
    "/events?since=0&until=1",
    "/host/info",
    "/v2/host/info",
    "/v2/dockerhub",
    "/browse/ls?volumeID=fuzz-none&path=/",
    "/v2/browse/get?volumeID=fuzz-none&path=/x",
    "/v1/browse/data/ls?path=/",
    "/swarmagent/status",
    "/swarmagent/identity",
    "/metrics",
    f"/containers/{NONE}/json",
    f"/exec/{NONE}/json",
    f"/images/{NONE}/json",
    f"/networks/{NONE}",
    "/websocket/exec?id=fuzz-none&nodeName=node1",
    "/websocket/attach?id=fuzz-none&nodeName=node2",
    "/v2/websocket/exec?id=fuzz-none",
    "/",
    "*",
    "http://node1:9001/ping",
]
WRITE_PATHS = [
    f"/containers/{NONE}/start",
    f"/containers/{NONE}",
    f"/images/{NONE}",
    f"/networks/{NONE}",
    f"/volumes/{NONE}",
    f"/exec/{NONE}/start",
    f"/browse/delete?volumeID={NONE}&path=/x",
    f"/browse/put?volumeID={NONE}",
    "/ping",
    "/agents",
]
VERBS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"]
ODD = [b"\x00", b"\r", b"\n", b"\x7f", b"\xff", b"\xc3\xa9", b" ", b"\t", b":", b"%", b"%zz", b"\\"]
TOKEN = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=12,
)
#: Header names drawn at random. Not the framing ones: a random length with
#: no body to match would make the agent wait, rightly (see :func:`inputs`).
HEADER_NAMES = [
    "Host",
    "Connection",
    "Upgrade",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Expect",
    "Content-Type",
    "Accept-Encoding",
    TARGET,
    MANAGER_OPERATION,
    BROADCAST,
    PUBLIC_KEY_HEADER,
    SIGNATURE_HEADER,
    "X-SwarmAgent-Hop",
    "X-Registry-Auth",
]
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
HEADER_VALUES = [
    "node1",
    "node2",
    "all",
    "node1,node2",
    ",",
    "nosuchnode",
    "1",
    "0",
    "-1",
    "chunked",
    "gzip, chunked",
    "identity",
    "close",
    "keep-alive",
    "Upgrade",
    "websocket",
    "13",
    "dGhlIHNhbXBsZSBub25jZQ==",
    "100-continue",
    "application/json",
    "application/x-tar",
    "",
]


@st.composite
def _odd_bytes(draw: st.DrawFn, max_size: int = 8) -> bytes:
    parts = draw(st.lists(st.one_of(st.sampled_from(ODD), st.binary(max_size=3)), max_size=3))
    return b"".join(parts)[:max_size]


def _maybe_odd(text: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    plain = text.map(lambda s: s.encode("utf-8"))
    spliced = st.tuples(plain, _odd_bytes(), st.integers(0, 64)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    )
    # Mostly clean, so that most inputs get past the parser to the routes.
    return st.integers(0, 9).flatmap(lambda n: spliced if n == 0 else plain)


@st.composite
def _method_path(draw: st.DrawFn, odd: bool = True) -> tuple[bytes, bytes]:
    kind = draw(st.integers(0, 9))
    if kind < 6:
        method, path = draw(st.sampled_from(["GET", "HEAD"])), draw(st.sampled_from(READ_PATHS))
    elif kind < 9:
        method = draw(st.sampled_from(VERBS[2:]))
        path = draw(st.sampled_from(WRITE_PATHS))
    else:  # an unknown method only on a harmless path
        method, path = draw(TOKEN), draw(st.sampled_from(WRITE_PATHS))
    if draw(st.booleans()) and path.startswith("/") and not path.startswith("/v"):
        path = draw(st.sampled_from(["/v1.41", "/v1.24", "/v9.99", "/v1.x"])) + path
    if not odd:
        return method.encode(), path.encode()
    return (
        draw(_maybe_odd(st.just(method))),
        draw(_maybe_odd(st.just(path))),
    )


@st.composite
def request_line(draw: st.DrawFn) -> bytes:
    """A request line: mostly well-formed, sometimes broken in one place."""
    method, path = draw(_method_path())
    version = draw(
        st.sampled_from([b"HTTP/1.1"] * 20 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP", b""])
    )
    sep = draw(st.sampled_from([b" "] * 20 + [b"  ", b"\t"]))
    return method + sep + path + (sep + version if version else b"")


@st.composite
def header_value(draw: st.DrawFn, signer: Signer) -> bytes:
    kind = draw(st.integers(0, 19))
    if kind < 12:
        value = draw(_maybe_odd(st.sampled_from(HEADER_VALUES)))
    elif kind < 15:
        value = draw(_maybe_odd(st.text(PRINTABLE, max_size=40)))
    elif kind < 18:
        value = draw(st.sampled_from([signer.public_key_hex, signer.sign(), "AAAA", "zz"])).encode()
    else:  # sizes around the limits: 8 KiB, 16 KiB and beyond
        size = draw(st.sampled_from([1000, 8200, 16400, 70000, 300000]))
        value = b"a" * size
    if draw(st.integers(0, 19)) == 0:  # obs-fold
        value += b"\r\n " + draw(_maybe_odd(st.sampled_from(HEADER_VALUES)))
    return value


@st.composite
def header(draw: st.DrawFn, signer: Signer) -> tuple[bytes, bytes]:
    name = draw(
        st.one_of(
            st.sampled_from(HEADER_NAMES).map(str.encode),
            st.sampled_from(HEADER_NAMES).map(lambda n: n.lower().encode()),
            _maybe_odd(TOKEN),
        )
    )
    return name, draw(header_value(signer))


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    """A whole chunked body (a bad size stops it: the rest cannot be read)."""
    out = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=3)):
        ext = draw(st.sampled_from([b"", b";a=b", b';a="q"', b";;", b"; x", b";\xff"]))
        size = draw(
            st.sampled_from([b"%x" % len(data)] * 4 + [b"%X" % len(data), b"0%x" % len(data)])
        )
        if draw(st.integers(0, 9)) == 0:
            return out + draw(st.sampled_from([b"zz", b"-1", b"0x1", b" 1", b"", b"1 1"])) + b"\r\n"
        out += size + ext + b"\r\n" + data + b"\r\n"
    trailers = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"Content-Length: 5\r\n", b"bad\r\n"]))
    return out + b"0\r\n" + trailers + b"\r\n"


#: Framings, the readable ones more often.
FRAMINGS = ["none"] * 4 + ["length"] * 3 + ["chunked"] * 3 + ["both"]
FRAMINGS += ["bad length", "two lengths", "bad te"]


@dataclass(frozen=True)
class Input:
    """One fuzz input: its bytes, the agent it goes to, and how it proves itself."""

    data: bytes
    agent: int
    certificate: bool


#: The agent's own headers, with values that mean something to it.
ROUTING_HEADERS = [
    (TARGET, ["node1", "node2", "nosuchnode", "", "node1,node2"]),
    (MANAGER_OPERATION, ["1", "true", ""]),
    (BROADCAST, ["all", "node1", "node2,node1", ",", "nosuchnode"]),
    ("X-SwarmAgent-Hop", ["id", ""]),
    # Without Connection: upgrade, not an upgrade to HTTP; the tree read one.
    ("Upgrade", ["tcp", "websocket"]),
]


@st.composite
def clean_inputs(draw: st.DrawFn, signer: Signer, agents: int) -> Input:
    """A well-formed request, for the routes behind the parser: the agent's
    own headers, a body as long as its framing says."""
    method, path = draw(_method_path(odd=False))
    headers = [(b"Host", b"node1")]
    for name, values in draw(st.lists(st.sampled_from(ROUTING_HEADERS), max_size=3)):
        headers.append((name.encode(), draw(st.sampled_from(values)).encode()))
    certificate = draw(st.integers(0, 4)) > 0
    if not certificate or draw(st.integers(0, 4)) == 0:
        headers += [
            (PUBLIC_KEY_HEADER.encode(), signer.public_key_hex.encode()),
            (SIGNATURE_HEADER.encode(), signer.sign().encode()),
        ]
    body = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        headers.append((b"Content-Length", b"%d" % len(body)))
    else:
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    head = [method + b" " + path + b" HTTP/1.1"] + [n + b": " + v for n, v in headers]
    data = b"\r\n".join(head) + b"\r\n\r\n" + body
    return Input(data, draw(st.integers(0, agents - 1)), certificate)


def requests(signer: Signer, agents: int) -> st.SearchStrategy[Input]:
    """Every input: well-formed ones for the routes, odd ones for the parsers."""
    return st.one_of(clean_inputs(signer, agents), inputs(signer, agents))


@st.composite
def inputs(draw: st.DrawFn, signer: Signer, agents: int) -> Input:
    """A complete request (or one whose framing cannot be read)."""
    eol = draw(st.sampled_from([b"\r\n"] * 19 + [b"\n"]))
    head = [draw(request_line())]
    headers = draw(st.lists(header(signer), max_size=6))
    if draw(st.booleans()):
        headers.insert(0, (b"Host", b"node1"))
    if draw(st.integers(0, 3)) == 0:
        headers += [
            (PUBLIC_KEY_HEADER.encode(), signer.public_key_hex.encode()),
            (SIGNATURE_HEADER.encode(), signer.sign().encode()),
        ]
    if draw(st.integers(0, 4)) == 0:  # a WebSocket upgrade head
        headers += [
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
        ]
    framing = draw(st.sampled_from(FRAMINGS))
    body = b""
    # Framing headers of the input's own: a body as long as they say, or
    # framing the agent cannot read (it owes a 400 at once).
    if framing == "length":
        body = draw(st.binary(max_size=64))
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing in ("chunked", "both"):
        body = draw(chunked_body())
        headers.append((b"Transfer-Encoding", b"chunked"))
        if framing == "both":
            headers.append((b"Content-Length", b"%d" % draw(st.integers(0, len(body)))))
    elif framing == "bad length":
        bad = [b"1x", b"-1", b"+1", b"0x1", b" ", b"1 1", b"1,1", b"1_0", b"\xd9\xa1", b"1e1"]
        headers.append((b"Content-Length", draw(st.sampled_from(bad))))
        body = b"x" * 10  # as long as the laxest reading of any of them
    elif framing == "two lengths":
        body = draw(st.binary(min_size=1, max_size=16))
        headers += [(b"Content-Length", b"%d" % n) for n in (len(body) - 1, len(body))]
    else:
        body = draw(chunked_body())
        te = [b"gzip", b"chunked, gzip", b"identity", b"xchunked", b"chunked, chunked", b"CHUNKED "]
        headers.append((b"Transfer-Encoding", draw(st.sampled_from(te))))
    head += [name + b":" + draw(st.sampled_from([b" ", b"", b"  "])) + v for name, v in headers]
    data = eol.join(head) + eol + eol + body
    return Input(data, draw(st.integers(0, agents - 1)), draw(st.integers(0, 4)) > 0)


# --- the oracle ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the agent did with an input."""

    kind: str  # "answered", "closed" or "hang"
    status: int = 0
    head: bytes = b""
    took: float = 0.0


def status_of(head: bytes) -> int:
    """The status of a response head (0 if it has no status line)."""
    first = head.split(b"\r\n", 1)[0].split(b" ")
    if len(first) >= 2 and first[0].startswith(b"HTTP/") and first[1].isdigit():
        return int(first[1])
    return 0


def problem(outcome: Outcome) -> str | None:
    """What is wrong with an outcome, if anything."""
    if outcome.kind == "hang":
        return f"neither an answer nor a close within {BOUND} s"
    if outcome.status == 500 and b"\napi-version:" not in outcome.head.lower():
        return f"the agent's own 500: {outcome.head[:300]!r}"
    if outcome.kind == "answered" and outcome.status == 0:
        return f"not an HTTP answer: {outcome.head[:300]!r}"
    return None


def _length(head: bytes) -> int:
    """The Content-Length a response head gives (0: none, or unreadable)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return 0


def exchange(host: str, port: int, context: ssl.SSLContext, data: bytes) -> Outcome:
    """Send ``data``; read until a whole response head, a close or :data:`BOUND`.

    Then its body too when a Content-Length gives its size, for up to
    :data:`BODY_GRACE` (not a HEAD's; a body late is no finding):
    the agent is then done with the answer as most clients let it be, where a
    client gone after the head made the reuse of a pooled upstream a race
    (the finding behind ``test_a_refused_tunnel_is_not_the_next_clients``).
    """
    started = time.monotonic()
    deadline = started + BOUND
    raw = socket.create_connection((host, port), timeout=BOUND)
    try:
        sock = context.wrap_socket(raw, server_hostname=host)
    except OSError:
        raw.close()
        raise
    with sock:
        # Closed while sending: what it answered first is read below.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        got = b""
        while b"\r\n\r\n" not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                return Outcome("hang", head=got, took=time.monotonic() - started)
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                chunk = b""
            if not chunk:
                break
            got += chunk
        took = time.monotonic() - started
        head, _, body = got.partition(b"\r\n\r\n")
        size = 0 if data.startswith((b"HEAD ", b"HEAD\t")) else _length(head)
        until = min(deadline, time.monotonic() + BODY_GRACE)
        while got and len(body) < size and time.monotonic() < until:
            sock.settimeout(max(0.01, until - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except (OSError, ssl.SSLError):
                break
            if not chunk:
                break
            body += chunk
    if not got:
        return Outcome("closed", took=took)
    return Outcome("answered", status_of(head), head, took)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Run:
    """A fuzz run against the lab's agents, and its counts."""

    lab: Lab
    agents: list[Agent]
    signer: Signer
    examples: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0
    failure: str = ""
    #: An input broke a rule: Hypothesis is shrinking it.
    shrinking: bool = False
    _log_sizes: dict[Path, int] = field(default_factory=dict)

    def contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        return self.lab.client_context(), self.lab.client_context(certificate=False)

    def new_log_lines(self) -> bytes:
        """What the agents logged since the last call."""
        out = b""
        for agent in self.agents:
            size = self._log_sizes.get(agent.log, 0)
            with open(agent.log, "rb") as f:
                f.seek(size)
                new = f.read()
            self._log_sizes[agent.log] = size + len(new)
            out += new
        return out

    def check(self, item: Input, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
        """Send one input and apply the oracle; raise AssertionError on a finding."""
        agent = self.agents[item.agent]
        context = contexts[0] if item.certificate else contexts[1]
        outcome = exchange(agent.node.ip, AGENT_PORT, context, item.data)
        self.examples += 1
        self.outcomes[f"{outcome.kind} {outcome.status or ''}".strip()] += 1
        self.slowest = max(self.slowest, outcome.took)
        why = problem(outcome)
        ping = agent.request("GET", "/ping", timeout=BOUND)
        if why is None and ping.status != 204:
            why = f"/ping on another connection answered {ping.status}"
        logged = self.new_log_lines()
        if why is None and any(alarm in logged for alarm in LOG_ALARMS):
            why = f"the agent logged an unhandled error:\n{logged[-3000:].decode(errors='replace')}"
        if why is not None:
            self.shrinking = True
            via = "client certificate" if item.certificate else "no certificate"
            raise AssertionError(f"{agent.node.name} ({via}), input {item.data[:600]!r}: {why}")


def fuzz(run: Run, budget: float, examples: int, seed: int | None) -> None:
    """Run batches of Hypothesis examples until the budget or the example count is spent."""
    ends = time.monotonic() + budget
    contexts = run.contexts()
    run.new_log_lines()  # what the agents logged before the run is not ours

    @settings(
        max_examples=50,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(requests(run.signer, len(run.agents)))
    def batch(item: Input) -> None:
        # Past the budget only a finding's shrinking goes on, for a while.
        spent = time.monotonic() > ends or run.examples >= examples
        if (spent and not run.shrinking) or time.monotonic() > ends + SHRINK_GRACE:
            return
        run.check(item, contexts)

    if seed is not None:
        batch = hypothesis_seed(seed)(batch)
    while time.monotonic() < ends and run.examples < examples:
        batch()
        if seed is not None:
            break  # one seeded batch is the reproducible form


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def _exit(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def _knows(agent: Agent, names: set[str]) -> bool:
    return {p["NodeName"] for p in agent.request("GET", "/agents").json()} == names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--budget", type=_seconds, default=600.0, help="seconds of fuzzing: 600 or 600s (600)"
    )
    parser.add_argument("--examples", type=int, default=10**9, help="stop after this many inputs")
    parser.add_argument("--seed", type=int, help="one seeded batch of 50, to replay")
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args(argv)
    ok, why = Lab.can_run()
    if not ok:
        print(f"cannot run the lab: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    # A CI timeout's SIGTERM unwinds through the lab's teardown too.
    signal.signal(signal.SIGTERM, _exit)
    with Lab(nodes=2, managers=1) as lab:
        agents = [lab.start_agent(node) for node in lab.nodes]
        for agent in agents:
            agent.wait_ready(30)
        names = {n.name for n in lab.nodes}
        for agent in agents:
            wait_until(
                functools.partial(_knows, agent, names),
                30,
                0.2,
                f"{agent.node.name} to know {sorted(names)}",
            )
        run = Run(lab, agents, Signer.generate())
        fuzz_started = time.monotonic()
        try:
            fuzz(run, args.budget, args.examples, args.seed)
        except AssertionError as e:
            run.failure = str(e)
        except Exception as e:  # the harness itself: a finding too, but say so
            run.failure = f"the fuzzer failed: {e!r}"
        fuzzed = time.monotonic() - fuzz_started
        logged = b"".join(a.log.read_bytes() for a in agents)
        if not run.failure and any(alarm in logged for alarm in LOG_ALARMS):
            run.failure = "an agent's log holds an unhandled error"
        if run.failure:
            print(lab.logs(40), file=sys.stderr)
    summary = {
        "examples": run.examples,
        "fuzz_seconds": round(fuzzed, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "slowest_answer_seconds": round(run.slowest, 2),
        "outcomes": dict(sorted(run.outcomes.items())),
        "failure": run.failure or None,
    }
    print(json.dumps(summary, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    if run.failure:
        print(f"FUZZ FINDING: {run.failure}", file=sys.stderr)
        return 1
    print(f"fuzz: {run.examples} inputs in {fuzzed:.0f} s, no finding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
