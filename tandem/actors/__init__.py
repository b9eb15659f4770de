"""Actor processes: spawn, start handshake, heartbeats, parent-death detection, errors and clean stop.

Parent side: ``ActorHandle.start(ActorSpec(...))``. Child side: the entry function named by the spec
is called with an ``ActorContext``. Socket options shared by every process live in ``sockets``.
"""

from tandem.actors.handle import ActorHandle, stop_all
from tandem.actors.logs import configure_logging
from tandem.actors.runtime import ActorContext
from tandem.actors.sockets import make_runtime_dir, make_socket, remove_runtime_dir
from tandem.actors.spec import ActorSpec, ActorStartError

__all__ = [
    "ActorContext",
    "ActorHandle",
    "ActorSpec",
    "ActorStartError",
    "configure_logging",
    "make_runtime_dir",
    "make_socket",
    "remove_runtime_dir",
    "stop_all",
]
