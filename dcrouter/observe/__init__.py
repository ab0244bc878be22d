"""What an operator watches the router through: Prometheus metrics (:mod:`.metrics`), webhooks
(:mod:`.webhooks`), the Server-Sent Events stream (:mod:`.stream`) and the listener that serves them
(:mod:`.service`). Each is fed by the router's :class:`dcrouter.events.EventBus`; none is on the mail path."""
