"""Python clients: `InferenceClient` (blocking) and `AsyncInferenceClient` (asyncio)."""

from .client import AsyncInferenceClient, InferenceClient, InferenceServerError

__all__ = ["AsyncInferenceClient", "InferenceClient", "InferenceServerError"]
