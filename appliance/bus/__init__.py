"""Local message bus between the vision and ranker processes (ZeroMQ, latest value wins)."""

from appliance.bus.latest import LatestPublisher, LatestSubscriber

__all__ = ["LatestPublisher", "LatestSubscriber"]
