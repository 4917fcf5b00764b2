"""Scheduling: queues, instances and their devices, behind the executors `Scheduler` makes."""

from .context import RequestContext
from .executor import Executor
from .pending import Pending
from .request import InferenceRequest, InferenceResponse, ModelKey
from .scheduler import Scheduler
from .statistics import ModelStatistics

__all__ = [
    "Executor",
    "InferenceRequest",
    "InferenceResponse",
    "ModelKey",
    "ModelStatistics",
    "Pending",
    "RequestContext",
    "Scheduler",
]
