"""The HTTP gateway: signed git-push webhooks and the REST API (`buildfleet gateway`)."""

from producer.gateway.settings import GatewaySettings, Rule, SupersedeSettings, WebhookSecret

__all__ = ["GatewaySettings", "Rule", "SupersedeSettings", "WebhookSecret"]
