"""The daemon's listening sockets: [server] listen / unix_socket, or systemd's LISTEN_FDS.

The daemon binds its sockets itself (before the model loads and before the privilege drop,
so ports below 1024 and root-owned socket directories work) and hands them to hypercorn as
``fd://N`` binds; hypercorn calls listen(backlog) on them once lifespan startup has finished,
so a client is refused, not left hanging, while the model loads.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from dataclasses import dataclass, field

from bitnetd_trio.config import split_listen_address
from bitnetd_trio.daemon.sdnotify import InheritedSocket
from bitnetd_trio.daemon.unix import DaemonError, resolve_credentials

__all__ = [
    "Listener",
    "adopt_inherited",
    "close_listeners",
    "open_listeners",
    "parse_listen_address",
]

log = logging.getLogger("bitnetd.listeners")


@dataclass
class Listener:
    """One socket the server accepts on, and how to describe and clean it up."""

    sock: socket.socket | None
    description: str  # "127.0.0.1:8080", "[::1]:8080", "unix:/run/bitnetd.sock", "fd:3 (name)"
    unix_path: str | None = None  # a socket file we created and must remove at exit
    fd: int = field(default=-1)

    def hypercorn_bind(self) -> str:
        """Give the socket to hypercorn: from now on hypercorn owns the descriptor."""
        if self.sock is not None:
            self.fd = self.sock.detach()
            self.sock = None
        return f"fd://{self.fd}"

    @property
    def port(self) -> int | None:
        """The bound TCP port (useful with port 0), or None for unix sockets."""
        s = self.sock if self.sock is not None else socket.socket(fileno=os.dup(self.fd))
        try:
            name = s.getsockname()
            return name[1] if isinstance(name, tuple) else None
        finally:
            if s is not self.sock:
                s.close()


def parse_listen_address(text: str) -> tuple[socket.AddressFamily, str, int]:
    """'127.0.0.1:8080', '[::1]:8080', '*:8080', 'localhost:8080' -> (family, address, port).

    The syntax is the configuration's (`config.split_listen_address`); a host name is resolved
    now (the first address getaddrinfo gives), as the C daemon did.
    """
    host, port = split_listen_address(text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(
            f"listen address {text!r}: cannot resolve {host!r}: {exc.strerror}"
        ) from None
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return socket.AddressFamily(family), sockaddr[0], port
    raise ValueError(f"listen address {text!r}: no IPv4 or IPv6 address for {host!r}")


def _bind_tcp(text: str) -> Listener:
    try:
        family, host, port = parse_listen_address(text)
    except ValueError as exc:
        raise DaemonError(f"[server] listen: {exc}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Without V6ONLY, [::]:8080 also takes IPv4 and 0.0.0.0:8080 beside it fails.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Linux copies TCP_NODELAY from the listener to every accepted connection: SSE
        # chunks must not wait for Nagle.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DaemonError(f"[server] listen: cannot bind {text}: {exc.strerror}") from None
    bound = sock.getsockname()
    desc = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
    return Listener(sock, desc)


def _bind_unix(path: str, mode: int | None, owner: str | None) -> Listener:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            if _unix_socket_answers(path):
                raise DaemonError(f"[server] unix_socket: {path} is in use by another process")
            os.unlink(path)  # a stale socket left by a previous run
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise DaemonError(f"[server] unix_socket: {path}: {exc.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a tight umask so that the socket is never reachable with a looser mode
    # between bind() and chmod().
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"[server] unix_socket: cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    listener = Listener(sock, f"unix:{path}", unix_path=path)
    try:
        if owner:
            user, _, group = owner.partition(":")
            creds = resolve_credentials(user or None, group or None)
            try:
                os.chown(
                    path,
                    -1 if creds.uid is None else creds.uid,
                    -1 if creds.gid is None else creds.gid,
                )
            except OSError as exc:
                raise DaemonError(
                    f"[server] unix_socket_owner: chown {path}: {exc.strerror}"
                ) from None
        if mode is not None:
            try:
                os.chmod(path, mode)
            except OSError as exc:
                raise DaemonError(
                    f"[server] unix_socket_mode: chmod {path}: {exc.strerror}"
                ) from None
    except DaemonError:
        close_listeners([listener])
        raise
    return listener


def _unix_socket_answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket at path (then it is not stale)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def open_listeners(
    listen: list[str],
    unix_socket: str | None = None,
    *,
    unix_socket_mode: int | None = 0o660,
    unix_socket_owner: str | None = None,
) -> list[Listener]:
    """Bind every configured address (not listening yet); DaemonError on the first failure."""
    listeners: list[Listener] = []
    try:
        for text in listen:
            listeners.append(_bind_tcp(text))
        if unix_socket:
            listeners.append(_bind_unix(unix_socket, unix_socket_mode, unix_socket_owner))
    except DaemonError:
        close_listeners(listeners)
        raise
    if not listeners:
        raise DaemonError("[server] listen and unix_socket are both empty: nothing to serve on")
    return listeners


def adopt_inherited(inherited: list[InheritedSocket]) -> list[Listener]:
    """Listeners for sockets passed by systemd (socket activation): used as they are."""
    result = []
    for item in inherited:
        try:
            st = os.fstat(item.fd)
        except OSError as exc:
            raise DaemonError(f"LISTEN_FDS: fd {item.fd}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise DaemonError(f"LISTEN_FDS: fd {item.fd} ({item.name}) is not a socket")
        sock = socket.socket(fileno=item.fd)
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise DaemonError(f"LISTEN_FDS: fd {item.fd} ({item.name}) is not a stream socket")
        try:
            name = sock.getsockname()
        except OSError:
            name = "?"
        if sock.family == socket.AF_UNIX:
            where = f"unix:{name.decode() if isinstance(name, bytes) else name}"
        elif sock.family == socket.AF_INET6:
            where = f"[{name[0]}]:{name[1]}"
        else:
            where = f"{name[0]}:{name[1]}"
        # systemd owns the socket file of an activated unix socket: never remove it.
        result.append(Listener(sock, f"{where} (fd {item.fd}, {item.name})"))
    return result


def close_listeners(listeners: list[Listener]) -> None:
    """Close sockets still owned by us and remove the unix socket files we created."""
    for listener in listeners:
        if listener.sock is not None:
            listener.sock.close()
            listener.sock = None
        if listener.unix_path:
            remove_unix_socket(listener.unix_path)


def remove_unix_socket(path: str) -> None:
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot remove unix socket %s: %s", path, exc.strerror)
