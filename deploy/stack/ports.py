"""Choosing loopback ports: the preferred one when it is free, otherwise any free one."""

import socket

from deploy.stack.errors import SetupError

LOOPBACK = "127.0.0.1"


def is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a TCP listener could bind ``host:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Without SO_REUSEADDR, a port in TIME_WAIT reads as taken, which is the safe answer.
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = LOOPBACK) -> int:
    """A port the kernel reports free on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def distinct_free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` different free ports (the kernel may offer one twice in a row)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def choose_port(preferred: int, *, required: int | None, what: str, env_var: str) -> int:
    """The port to listen on for ``what``.

    ``required`` is a port the user asked for explicitly (through ``env_var``): it must be free.
    Otherwise ``preferred`` is used when free, else any free port.
    """
    if required is not None:
        if not is_free(required):
            raise SetupError(
                f"{what} port {required} (from {env_var}) is already in use: "
                f"stop whatever listens there or unset {env_var} to let Galvani choose a free port"
            )
        return required
    return preferred if is_free(preferred) else free_port()


# The state column of /proc/net/tcp.
TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


def tcp_sockets(port: int, state: str) -> set[str]:
    """The inodes of the IPv4 TCP sockets in ``state`` whose local port is ``port`` (Linux,
    from /proc/net/tcp); a process's ``/proc/<pid>/fd`` links name the same inodes."""
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)  # the heading
        for line in table:
            fields = line.split()
            if fields[3] == state and int(fields[1].rpartition(":")[2], 16) == port:
                found.add(fields[9])
    return found


def listeners(port: int) -> int:
    """How many IPv4 TCP sockets listen on ``port``. With ``SO_REUSEPORT`` each process
    serving the port has its own."""
    return len(tcp_sockets(port, TCP_LISTEN))
