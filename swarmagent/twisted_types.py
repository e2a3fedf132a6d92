"""Types Twisted leaves loose, as the agent uses them.

The agent's reactor (an intersection of reactor interfaces) and the part of
it a client needs, a connection's transport as a tunnel drives it, what a
resource's ``render`` returns, and a request's body file and arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Protocol, cast

from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorSocket,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
    ITransport,
)
from twisted.internet.protocol import ClientFactory
from twisted.web.server import Request

#: A ``render`` method's answer: the body, or ``NOT_DONE_YET`` (an int).
Rendered = bytes | int


class IAgentReactor(
    IReactorCore,
    IReactorTime,
    IReactorTCP,
    IReactorUNIX,
    IReactorThreads,
    IReactorPluggableNameResolver,
    IReactorSocket,
):
    """Everything ``makeService`` asks of its reactor.

    A type for the checker only: no reactor declares it, so the caller casts
    one that provides each part (every POSIX reactor does).
    """


def installed_reactor() -> IAgentReactor:
    """The installed (global) reactor, as an :class:`IAgentReactor`."""
    from twisted.internet import reactor

    # Typed with the common interfaces only; the POSIX reactors twistd
    # installs also run threads, UNIX sockets and the name resolver.
    return cast(IAgentReactor, reactor)


class ClientReactor(Protocol):
    """What an HTTP client's endpoints, pool and ``Agent`` ask of a reactor.

    ``IReactorTime`` and ``IReactorTCP`` (``HostnameEndpoint``), and
    ``IReactorUNIX`` for an engine on a socket file; their methods' signatures,
    as a structural type, so any reactor that has them fits (the agent's, a
    ``MemoryReactorClock``) with no declaration.
    """

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kwargs: object
    ) -> IDelayedCall: ...
    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30.0,
        bindAddress: tuple[str, int] | None = None,
    ) -> IConnector: ...
    def connectUNIX(
        self, address: str, factory: ClientFactory, timeout: float = 30, checkPID: bool = False
    ) -> IConnector: ...


class StreamTransport(Protocol):
    """A connection's transport as a tunnel or a console drives it.

    TCP's and TLS's (over TCP) transports: an ``ITransport`` that is also an
    ``IConsumer`` and an ``IPushProducer``, and half-closeable
    (``ITCPTransport.loseWriteConnection``). Structural, as no interface
    joins them; Twisted's transports match it.
    """

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def loseWriteConnection(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


def stream_transport(transport: ITransport | None) -> StreamTransport:
    """A connection's transport as the TCP or TLS one it is.

    ``Protocol.transport`` and ``HTTPChannel.transport`` are typed
    ``ITransport`` (or None) only.
    """
    return cast(StreamTransport, transport)


def request_body(request: Request) -> IO[bytes] | None:
    """The request's body file, None before twisted.web made one.

    ``Request`` declares ``content = None`` at class level, which the checker
    reads as always None; it is a ``BinaryIO`` once the body is being read.
    """
    return cast("IO[bytes] | None", request.content)


def request_args(request: Request) -> dict[bytes, list[bytes]]:
    """The request's query arguments (empty before twisted.web parsed any).

    ``Request`` declares ``args = None`` at class level, as it does ``content``.
    """
    return cast("dict[bytes, list[bytes]] | None", request.args) or {}
