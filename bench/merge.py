"""Micro-benchmark: the cluster list's merge, stdlib decode-tag-encode vs tagging as bytes.

No lab: N nodes' container lists, shaped like a swarm engine's answer (Go's
escapes, a task's labels, one network), are merged as the entry agent does.
CPU ms per merge (``time.process_time``), medians with p25-p75 over
interleaved rounds::

    python -m bench.merge                  # 10 nodes x 500 containers
    python -m bench.merge --nodes 30 --containers 20 --rounds 31
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

from swarmagent.nodelist import node_list
from swarmagent.nodes import tag
from swarmagent.wire import NODE_LABEL


def container(rng: random.Random, i: int) -> dict[str, object]:
    """One item of ``GET /containers/json?all=1`` for a swarm task (about 1.4 KB)."""
    cid = f"{rng.getrandbits(256):064x}"
    task = f"{rng.getrandbits(100):025x}"
    return {
        "Id": cid,
        "Names": [f"/web_{i}.1.{task}"],
        "Image": "nginx:1.27@sha256:" + "a" * 64,
        "ImageID": "sha256:" + "b" * 64,
        "Command": "/docker-entrypoint.sh nginx -g 'daemon off;'",
        "Created": 1_700_000_000 + i,
        "Ports": [{"PrivatePort": 80, "Type": "tcp"}],
        "Labels": {
            "com.docker.stack.namespace": "web",
            "com.docker.swarm.node.id": "n" * 25,
            "com.docker.swarm.service.id": "s" * 25,
            "com.docker.swarm.service.name": f"web_{i}",
            "com.docker.swarm.task": "",
            "com.docker.swarm.task.id": task,
            "com.docker.swarm.task.name": f"web_{i}.1.{task}",
            "maintainer": "NGINX Docker Maintainers <docker-maint@nginx.com>",
        },
        "State": "running",
        "Status": "Up 2 hours",
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {
            "Networks": {
                "web_default": {
                    "IPAMConfig": {"IPv4Address": "10.0.1.5"},
                    "Links": None,
                    "Aliases": None,
                    "NetworkID": "w" * 25,
                    "EndpointID": "e" * 64,
                    "Gateway": "",
                    "IPAddress": "10.0.1.5",
                    "IPPrefixLen": 24,
                    "MacAddress": "02:42:0a:00:01:05",
                    "DriverOpts": None,
                }
            }
        },
        "Mounts": [],
    }


def bodies(nodes: int, containers: int, seed: int = 1) -> dict[str, bytes]:
    """Each node's answer, escaped as Go's encoder writes it."""
    rng = random.Random(seed)
    out = {}
    for n in range(nodes):
        text = json.dumps([container(rng, i) for i in range(containers)], separators=(",", ":"))
        text = text.replace("<", "\\u003c").replace(">", "\\u003e")
        out[f"node{n + 1}"] = (text + "\n").encode("utf-8")
    return out


def stdlib_merge(answers: dict[str, bytes]) -> bytes:
    """The merge before msgspec: decode, tag, label, encode each node's list."""
    chunks = []
    for node, body in answers.items():
        items = tag(json.loads(body), node)
        for item in items:
            if isinstance(item, dict):
                labels = item.get("Labels")
                if not isinstance(labels, dict):
                    labels = item["Labels"] = {}
                labels[NODE_LABEL] = node
        chunks.append(json.dumps(items, separators=(",", ":"))[1:-1].encode("utf-8"))
    return b"[" + b",".join(chunks) + b"]"


def bytes_merge(answers: dict[str, bytes]) -> bytes:
    """The merge now: each node's list tagged as bytes (with its IDs and names, as served)."""
    chunks = [
        node_list("containers", body, node, ids=True, names=True).items
        for node, body in answers.items()
    ]
    return b"[" + b",".join(chunks) + b"]"


def cpu_ms(merge: Callable[[dict[str, bytes]], bytes], answers: dict[str, bytes]) -> float:
    started = time.process_time()
    merge(answers)
    return (time.process_time() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--containers", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    answers = bodies(args.nodes, args.containers)
    size = sum(len(b) for b in answers.values())
    if json.loads(stdlib_merge(answers)) != json.loads(bytes_merge(answers)):
        raise SystemExit("the two merges differ")
    merges = {"stdlib": stdlib_merge, "bytes": bytes_merge}
    times: dict[str, list[float]] = {name: [] for name in merges}
    for _ in range(args.rounds):
        for name, merge in merges.items():
            times[name].append(cpu_ms(merge, answers))
    print(f"{args.nodes} nodes x {args.containers} containers, {size / 1e6:.2f} MB in")
    for name, ms in times.items():
        q = statistics.quantiles(ms, n=4)
        print(f"  {name:7} {statistics.median(ms):7.1f} ms CPU (p25 {q[0]:.1f}, p75 {q[2]:.1f})")
    ratio = statistics.median(times["stdlib"]) / statistics.median(times["bytes"])
    print(f"  bytes merge is {ratio:.1f}x cheaper")


if __name__ == "__main__":
    main()
