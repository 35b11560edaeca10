"""What every onnxpipe process on a Ray node needs: Ray itself (a clear message without it), ONNX Runtime threads
sized from the CPUs Ray gave it, and the model folders present on its node."""
from __future__ import annotations

from pathlib import Path


def require_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("onnxpipe.ray needs Ray: pip install 'onnxpipe[ray]'") from None
    return ray


def assigned_threads(default: int | None = None) -> int | None:
    """ONNX Runtime intra-op threads for this replica or actor: the CPUs Ray assigned it (at least 1). Ray sets
    OMP_NUM_THREADS from them, which ONNX Runtime ignores: without this every process would spin up a thread per
    core of the node and the replicas would fight over the cores."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if not cpus:
        return default
    return max(1, int(cpus))


def node_name() -> str:
    import ray

    context = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()} (node {context.get_node_id()[:12]})"


def check_models_here(paths) -> None:
    """Model folders must be at the same path on every node: say which node lacks which."""
    for path in paths:
        path = Path(path)
        if not (path / "onnxpipe.json").is_file():
            what = "has no onnxpipe.json" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"model folder {path} {what} on Ray node {node_name()}: every node needs each "
                                    "model folder at the same path (copy it there, or mount shared storage)")


def interfaces_up() -> list[str]:
    """Network interfaces up in this process's network namespace, loopback aside: what a Ray started here could be
    reached on (it binds every interface). Asked of the kernel (SIOCGIFFLAGS): /sys/class/net shows the namespace
    sysfs was mounted in, not necessarily ours. Tests and benchmarks start Ray only where this is empty."""
    import fcntl
    import socket
    import struct

    up = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack("16sH14s", name.encode()[:15], 0, b"")
            flags = struct.unpack("16sH14s", fcntl.ioctl(s.fileno(), 0x8913, request))[1]  # SIOCGIFFLAGS
            if name != "lo" and flags & 0x1:  # IFF_UP
                up.append(name)
    return up
