"""Who may talk to the daemon, and as whom: the socket, its directory, peer credentials, trust, key scoping.

Trust decides who gets the arena's memfd (Note [arena trust] in server.py);
scoping keeps one uid's keys out of another's reach.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
import struct
from pathlib import Path

from tierd.config import Config
from tierd.engine.keys import namespace_of, owner_of, scope, user_key, validate_key
from tierd.errors import Busy, ConfigError

__all__ = ["SocketClaim", "Identity", "check_socket_dir", "peer_credentials"]

log = logging.getLogger("tierd.daemon")

_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


class Identity:
    """Trust and key scoping under one config (swapped whole at a reload)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def trusted(self, uid: int) -> bool:
        """Whether ``uid`` may map the whole host arena (Note [arena trust])."""
        return uid in (0, os.geteuid()) or uid in self.config.daemon.trusted_uids

    def scope(self, key: str, uid: int | None) -> str:
        """The engine's key for user key ``key`` sent by ``uid`` (validated first)."""
        validate_key(key)
        if self.config.namespace(namespace_of(key)).shared:
            return key
        return scope(key, uid)

    def visible(self, engine_key: str, uid: int) -> str | None:
        """The user key that ``uid`` sees for ``engine_key``, or None if it is another uid's."""
        key, owner = user_key(engine_key), owner_of(engine_key)
        if owner is not None:
            return key if owner == str(uid) else None
        return key if self.config.namespace(namespace_of(key)).shared else None


class SocketClaim:
    """This daemon's hold on its socket path: the directory checked, the lock taken, a stale socket removed.

    One daemon per socket: the flock on ``PATH.lock`` is the arbiter; the
    socket file alone cannot tell a live daemon from one that crashed.

    Raises:
        ConfigError: the directory would let another user replace the socket.
        Busy: another daemon serves on the path.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
            os.chmod(path.parent, 0o700)  # mkdir's mode went through the umask
        check_socket_dir(path.parent)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Busy(
                f"another tierd daemon (pid {owner}) is serving on {path}; stop it first, "
                "or give this one its own daemon.socket"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd: int | None = fd
        if path.exists() or path.is_symlink():
            log.warning("removing stale socket %s left by a daemon that did not stop cleanly", path)
            path.unlink()

    def release(self) -> None:
        """Remove the socket and give up the lock; idempotent."""
        if self._lock_fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.path, exc)
        os.close(self._lock_fd)
        self._lock_fd = None


def check_socket_dir(directory: Path) -> None:
    """Refuse a socket directory that someone else could use to replace our socket.

    The socket itself is 0660; the directory decides who reaches it: 0700
    (the daemon's uid) or 0750 (a group of clients, systemd's
    RuntimeDirectoryMode). One another uid owns, or that others may write
    into without the sticky bit, would let them swap in their own socket.
    """
    st = directory.stat()
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        raise ConfigError(
            f"socket directory {str(directory)!r} is owned by uid {st.st_uid}, not by this daemon's uid {euid} "
            "or root; another user could replace the socket: remove the directory or choose another daemon.socket"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        who = "others" if mode & 0o002 else "group"
        raise ConfigError(
            f"socket directory {str(directory)!r} is writable by {who} (mode {mode:04o}), so they could replace "
            "the socket; chmod it to 0700, or 0750 to let a group of clients connect"
        )
