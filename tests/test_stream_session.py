"""StreamSession in-process: requests a stream started but never answered (the client went
away) still finish their contexts when the stream closes, so whatever counts them (limits
per client, metrics, the access log) hears the end of each."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from tiffin.scheduler import Pending
from tiffin.scheduler.context import RequestContext
from tiffin.server.grpc.streams import StreamSession


def test_closing_finishes_the_contexts_of_unanswered_requests() -> None:
    contexts: list[RequestContext] = []
    finished: list[str] = []

    def start(message: Any) -> tuple[Pending, Any, RequestContext]:
        context = RequestContext("grpc", "stream_infer")
        context.on_finish.append(lambda c: finished.append(c.status))
        contexts.append(context)
        # Never queued anywhere: the requests stay unanswered.
        return Pending(SimpleNamespace()), None, context  # type: ignore[arg-type]

    messages = [SimpleNamespace(id=str(i), model_name="m", model_version="") for i in range(3)]
    session = StreamSession(iter(messages), start, window=8)
    session.start()
    deadline = time.monotonic() + 5
    while len(contexts) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(contexts) == 3
    session.close()
    assert finished == ["CANCELLED"] * 3
    session.close()  # a second close finishes nothing twice
    assert finished == ["CANCELLED"] * 3
