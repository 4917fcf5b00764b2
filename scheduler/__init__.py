"""Scheduling: queues, instances and their devices, behind `Scheduler.submit()`."""

from .request import InferenceRequest, InferenceResponse, ModelKey
from .scheduler import Scheduler
from .statistics import ModelStatistics

__all__ = ["InferenceRequest", "InferenceResponse", "ModelKey", "ModelStatistics", "Scheduler"]
