"""What the server tells those who watch it: Prometheus metrics on their own port."""

from .metrics import Metrics, MetricsEndpoint

__all__ = ["Metrics", "MetricsEndpoint"]
