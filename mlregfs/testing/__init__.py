"""The one harness of real processes for tests, the bench and `mlregfs demo`: `mlregfs serve`
(ServerProcess), FUSE mounts (Mount, FuseProcess) and free ports.

It imports no client module (a mount is `python -m mlregfs mount` in a subprocess), so the
server's tests can use it too.
"""

from mlregfs.testing.mount import FuseProcess, Mount, clean_env, is_mounted, unmount, wait_for_mount
from mlregfs.testing.ports import free_port
from mlregfs.testing.server import ServerProcess

__all__ = [
    "FuseProcess",
    "Mount",
    "ServerProcess",
    "clean_env",
    "free_port",
    "is_mounted",
    "unmount",
    "wait_for_mount",
]
