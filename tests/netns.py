"""Hosts with their own addresses on one machine: Linux network namespaces joined by a bridge.

Each host is a namespace with one veth link to a bridge that lives in a namespace of its own, so nothing of
the test touches the machine's own interfaces and its traffic stays inside namespaces it made (no host has a
route beyond the bridge's subnet). Cutting a host's link on the bridge side is a partition: its processes
keep running, their packets go nowhere, and peers see silence, not a closed connection.
Needs root and iproute2 (`make system-deps`).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from dataclasses import dataclass

import pytest

from tests.deploy_helpers import system_binary


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    ip: str
    link: str       # its link's name on the bridge side

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host (ip netns exec execs it: the process keeps its pid)."""
        return [system_binary("ip"), "netns", "exec", self.netns, *map(str, argv)]


class Network:
    def __init__(self):
        if os.geteuid() != 0:
            pytest.skip("network namespaces need root (CI runs as root)")
        self.ip = system_binary("ip")
        tag = uuid.uuid4().hex[:6]
        self.prefix = f"mdpo{tag}"
        # A private subnet picked per test run; no host has a default route, so nothing leaves the bridge.
        self.subnet = f"10.{int(tag[:2], 16) % 200 + 20}.{int(tag[2:4], 16)}"
        self.bridge_ns = f"{self.prefix}-br"
        self.hosts: dict[str, Host] = {}
        # `ip netns add` bind-mounts /run/netns onto itself the first time; close() undoes that if it was us.
        self.mounted_run_netns = " /run/netns " in Path("/proc/mounts").read_text()
        self._run("netns", "add", self.bridge_ns)
        self._run("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        self._run("-n", self.bridge_ns, "link", "set", "br0", "up")

    def _run(self, *args: str) -> None:
        result = subprocess.run([self.ip, *args], capture_output=True, text=True)
        assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr.strip()}"

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 2
        host = Host(name, f"{self.prefix}-{index}", f"{self.subnet}.{index}", f"h{index}")
        self._run("netns", "add", host.netns)
        self._run("link", "add", "eth0", "netns", host.netns, "type", "veth", "peer", "name", host.link,
                  "netns", self.bridge_ns)
        self._run("-n", self.bridge_ns, "link", "set", host.link, "master", "br0", "up")
        self._run("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        self._run("-n", host.netns, "link", "set", "eth0", "up")
        self._run("-n", host.netns, "link", "set", "lo", "up")
        self.hosts[name] = host
        return host

    def host_of(self, ip: str) -> Host:
        return next(h for h in self.hosts.values() if h.ip == ip)

    def cut(self, host: Host) -> None:
        """Partition `host`: its link goes down on the bridge side; the host itself sees nothing happen."""
        self._run("-n", self.bridge_ns, "link", "set", host.link, "down")

    def listening(self, host: Host) -> list[str]:
        """ip:port of every TCP socket listening inside `host` (IPv4, and IPv4-mapped IPv6 as gRPC opens them)."""
        out = subprocess.run(host.argv(["cat", "/proc/net/tcp", "/proc/net/tcp6"]), capture_output=True, text=True,
                             check=True).stdout
        found = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A" or ":" not in fields[1]:     # 0A: LISTEN
                continue
            addr, port = fields[1].split(":")
            words = [bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8)]   # host-order 32-bit words
            raw = b"".join(words)
            if raw == bytes(16):
                raw = bytes(4)     # :: (every address)
            elif raw[:12] == bytes(10) + b"\xff\xff":
                raw = raw[12:]     # ::ffff:a.b.c.d
            ip = ".".join(map(str, raw)) if len(raw) == 4 else raw.hex()
            found.append(f"{ip}:{int(port, 16)}")
        return found

    def close(self) -> None:
        """Delete every namespace made here (their links go with them). Processes still inside must be gone first."""
        for netns in [h.netns for h in self.hosts.values()] + [self.bridge_ns]:
            subprocess.run([self.ip, "netns", "del", netns], capture_output=True)
        run_netns = Path("/run/netns")
        if not self.mounted_run_netns and run_netns.is_dir() and not any(run_netns.iterdir()):
            subprocess.run(["umount", str(run_netns)], capture_output=True)
