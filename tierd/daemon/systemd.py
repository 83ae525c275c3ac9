"""sd_notify(3) without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

``READY=1`` once arenas and index are up, ``WATCHDOG=1`` every half of
``$WATCHDOG_USEC`` while the daemon is healthy, ``STOPPING=1`` when a
graceful shutdown starts, ``STATUS=...`` for ``systemctl status``.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify", "watchdog_interval_s"]

log = logging.getLogger("tierd.daemon.systemd")


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ...) to systemd; False when not run under it."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # '@' = abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
        return True
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", path, exc)  # like sd_notify(3): not fatal, not noisy
        return False


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1 (half the configured timeout), or None if no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
