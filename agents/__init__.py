"""Long-running actors the flows call: so far the outbox dispatcher."""

from agents.outbox import OutboxDispatcher

__all__ = ["OutboxDispatcher"]
