"""Several hosts on one machine, for tests: a network namespace per host, each with its own
private address on a bridge the test creates, its own hostname (a UTS namespace per process),
and processes that bind to that address. Everything is torn down by process id, namespace and
link name. Needs root and iproute2 (`ip netns`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from radloop.app.supervisor import ChildProcess
from radloop.wait import wait_until

IP = "/usr/sbin/ip"


def usable() -> str | None:
    """None when this machine can make test hosts, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not Path(IP).exists() or shutil.which("unshare") is None:
        return "iproute2 and util-linux (unshare) are needed"
    return None


def _ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True)


@dataclass
class Host:
    """One test host: namespace `netns`, address `address`, hostname `name`."""

    name: str
    netns: str
    address: str
    processes: list[ChildProcess] = field(default_factory=list)

    def argv(self, command: Sequence[str]) -> list[str]:
        """`command` run on this host: in its network namespace, with its own hostname."""
        return [
            IP,
            "netns",
            "exec",
            self.netns,
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            self.name,
            *command,
        ]

    def start(
        self, label: str, command: Sequence[str], env: Mapping[str, str], log: Path
    ) -> ChildProcess:
        """Start `command` on this host as a guarded child (it dies with the test)."""
        process = ChildProcess(f"{label}@{self.name}", self.argv(command), dict(env), log)
        process.start()
        self.processes.append(process)
        return process


class Network:
    """Test hosts on one bridge; this process reaches them at the bridge's own address."""

    def __init__(self, names: Sequence[str]) -> None:
        tag = f"{os.getpid() % 100000}"
        # 10.250.0.0/16 is private and unused here; the third octet keeps concurrent runs apart.
        self.prefix = f"10.250.{os.getpid() % 250 + 1}"
        self.bridge = f"rlb{tag}"
        self.gateway = f"{self.prefix}.1"  # this process's address on the bridge
        self.hosts: dict[str, Host] = {}
        self._names = list(names)
        self._links: list[str] = []
        self._tag = tag

    def __enter__(self) -> Network:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for index, name in enumerate(self._names, start=10):
                netns = f"rl{self._tag}-{name}"
                _ip("netns", "add", netns)
                self.hosts[name] = Host(name, netns, f"{self.prefix}.{index}")
                link = f"rl{self._tag}h{index}"
                _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
                self._links.append(link)
                _ip("link", "set", link, "master", self.bridge, "up")
                _ip("-n", netns, "addr", "add", f"{self.prefix}.{index}/24", "dev", "eth0")
                _ip("-n", netns, "link", "set", "eth0", "up")
                _ip("-n", netns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def stop_processes(self) -> None:
        """Stop the processes started with `Host.start`, by pid, newest first."""
        for host in self.hosts.values():
            for process in reversed(host.processes):
                process.stop(signal.SIGTERM, timeout=20)

    def close(self) -> None:
        """Stop every process (by pid), kill what is left in each namespace, delete the
        namespaces, the veth pairs and the bridge."""
        self.stop_processes()
        for host in self.hosts.values():
            pids = subprocess.run(
                [IP, "netns", "pids", host.netns], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", host.netns)
        for link in self._links:  # gone with their namespace's peer; make sure
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", link)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.bridge)


@contextlib.contextmanager
def network(names: Sequence[str]) -> Iterator[Network]:
    with Network(names) as hosts:
        yield hosts


def wait_listening(address: str, port: int, timeout: float = 60.0) -> None:
    import socket

    def accepts() -> bool:
        try:
            with socket.create_connection((address, port), timeout=1):
                return True
        except OSError:
            return False

    wait_until(accepts, timeout=timeout, interval=0.3, what=f"{address}:{port} listening")
