"""Which TCP addresses processes listen on, read from /proc (Linux), for the tests that
check a stack listens on loopback only."""

from __future__ import annotations

import contextlib
import ipaddress
import os


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    found.add(target[8:-1])
    return found


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    # /proc/net/tcp{,6} print each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening_sockets(pids: list[int]) -> dict[int, list[str]]:
    """pid → the TCP addresses (``host:port``) each of ``pids`` listens on."""
    listening: dict[str, str] = {}  # socket inode → address
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    host, port = fields[1].split(":")
                    listening[fields[9]] = f"{_address(host)}:{int(port, 16)}"
    return {
        pid: sorted(listening[inode] for inode in _socket_inodes(pid) if inode in listening)
        for pid in pids
    }


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rpartition(":")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def not_on_loopback(pids: dict[int, str]) -> dict[str, list[str]]:
    """command line (pid → command line in) → the addresses it listens on beyond loopback
    (0.0.0.0 and :: are every interface)."""
    found = {}
    for pid, addresses in listening_sockets(list(pids)).items():
        wide = [address for address in addresses if not is_loopback(address)]
        if wide:
            found[f"{pid} {pids[pid][:200]}"] = wide
    return found
