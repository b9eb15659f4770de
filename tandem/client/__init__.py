"""Python clients of the tandem ZeroMQ protocol (PROTOCOL.md): blocking and asyncio."""

from tandem.client.async_client import AsyncStream, AsyncTandemClient
from tandem.client.common import (
    Completion,
    ContextLengthError,
    EmbeddingResult,
    InvalidRequestError,
    ProtocolVersionError,
    ServerBusyError,
    ShuttingDownError,
    TandemConnectionError,
    TandemError,
    TandemTimeout,
    WorkerDiedError,
)
from tandem.client.sync_client import Stream, TandemClient
from tandem.messages import ChatMessage, Finished, Health, SamplingParams, ServerHello, TokenDelta

__all__ = [
    "AsyncStream",
    "AsyncTandemClient",
    "ChatMessage",
    "Completion",
    "ContextLengthError",
    "EmbeddingResult",
    "Finished",
    "Health",
    "InvalidRequestError",
    "ProtocolVersionError",
    "SamplingParams",
    "ServerBusyError",
    "ServerHello",
    "ShuttingDownError",
    "Stream",
    "TandemClient",
    "TandemConnectionError",
    "TandemError",
    "TandemTimeout",
    "TokenDelta",
    "WorkerDiedError",
]
