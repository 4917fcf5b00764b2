"""The server: model registry, data plane, front doors (gRPC, REST) and serverctl."""

from .server import Server
from .settings import ServerSettings

__all__ = ["Server", "ServerSettings"]
