"""The FastAPI peer: the strongest plain-Python baseline, run as its own process.

One `def` endpoint per model, `POST /<model>`: the body is one batch-1 item as raw
little-endian FP32 bytes, the answer the output's raw bytes. onnxruntime runs each request
on its own (no batching), with one intra-op thread and spinning off, as a careful hand-written
service would. FastAPI runs `def` endpoints on its thread pool, so the event loop keeps
reading requests while onnxruntime (which releases the GIL) computes.

This file is run by path with the peers' Python (`benchmarks/.peers-venv`, or the main
environment when it has fastapi and uvicorn): it imports only fastapi, uvicorn, onnxruntime
and numpy, never Tiffin.

  python benchmarks/peers/fastapi_app.py --repository benchmarks/models --models mlp,cnn --port 8000
"""

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations as
# objects (Request, bytes) to tell what each parameter is.
from onnx_session import INPUT, OUTPUT, load_session


def make_endpoint(session: Any) -> Callable[..., Any]:
    """The `def` endpoint of one model: raw FP32 bytes in, raw FP32 bytes out."""
    import numpy as np
    from fastapi import Depends, HTTPException, Request, Response

    item_shape = [int(d) for d in session.get_inputs()[0].shape[1:]]
    item_bytes = 4 * int(np.prod(item_shape))

    async def raw_body(request: Request) -> bytes:
        # A dependency, because a `def` endpoint cannot await the body itself.
        return await request.body()

    def infer(body: bytes = Depends(raw_body)) -> Response:  # noqa: B008 (FastAPI's idiom)
        if len(body) != item_bytes:
            raise HTTPException(400, f"expected {item_bytes} bytes (one item), got {len(body)}")
        x = np.frombuffer(body, dtype="<f4").reshape(1, *item_shape)
        (y,) = session.run([OUTPUT], {INPUT: x})
        return Response(
            y.astype("<f4", copy=False).tobytes(), media_type="application/octet-stream"
        )

    return infer


def build_app(repository: Path, models: list[str]) -> Any:
    """The FastAPI application serving version 1 of each model of the repository."""
    from fastapi import FastAPI

    app = FastAPI()
    for name in models:
        session = load_session(repository / name / "1" / "model.onnx")
        app.post(f"/{name}")(make_endpoint(session))

    @app.get("/health")
    def health() -> dict:
        return {"ready": True}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="The FastAPI peer of the Tiffin benchmarks.")
    parser.add_argument("--repository", type=Path, required=True, help="benchmark repository")
    parser.add_argument("--models", required=True, help="comma-separated model names")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvicorn

    # uvicorn stops gracefully on SIGTERM, then raises the signal again with the handler that
    # was in place before it: this one makes that a clean exit (status 0), like the others.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    app = build_app(args.repository, [m for m in args.models.split(",") if m])
    # One worker process (the server has one core); no access log, as in production.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
