"""The gRPC frontend, model manager and serverctl."""

from .server import Server
from .settings import ServerSettings

__all__ = ["Server", "ServerSettings"]
