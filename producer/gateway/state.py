"""The gateway's state, made once per application: settings (and where traces are seen),
the client, the ledger, the admissions, the event hub, the limiters and the metrics. The
handlers (producer.gateway.hooks, .api and .ui) read and use it; nothing here speaks HTTP."""

from __future__ import annotations

import asyncio
import os

from producer.client import BuildfleetClient
from producer.contract import BuildState
from producer.errors import BuildNotFound
from producer.gateway.admission import Admissions
from producer.gateway.auth import Tokens, request_policy
from producer.gateway.ledger import Ledger
from producer.gateway.limits import RateLimiter, Slots
from producer.gateway.metrics import GatewayMetrics
from producer.gateway.settings import GatewaySettings, TokenSettings
from producer.gateway.streams import EventHub
from producer.policy import RequestPolicy
from producer.settings import TelemetrySettings


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        client: BuildfleetClient,
        telemetry: TelemetrySettings | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry or TelemetrySettings()
        self.client = client
        self.redis = client.redis
        queue = client.store.queue
        self.metrics = GatewayMetrics()
        self.stopping = asyncio.Event()
        self.ledger = Ledger(
            client.redis,
            client.store,
            settings.supersede,
            queue=queue.name,
            delivery_ttl_s=settings.delivery_ttl_s,
            history_ttl_s=settings.push_history_ttl_s,
        )
        self.admissions = Admissions(client.redis, queue.name)
        self.hub = EventHub(client.redis, instance=os.urandom(8).hex())
        self.tokens = Tokens(settings.tokens)
        self.policies: dict[str, RequestPolicy] = {
            token.name: request_policy(
                token, settings.sources, settings.git_hosts, queue.max_timeout_s
            )
            for token in settings.tokens
        }
        limits = settings.limits
        self.api_rate = RateLimiter(limits.requests_per_s, limits.burst)
        self.hook_rate = RateLimiter(limits.webhooks_per_s, limits.webhook_burst)
        self.streams = Slots(limits.streams_per_token, limits.streams)

    async def visible_state(self, build_id: str, token: TokenSettings) -> BuildState:
        """The build's state if `token` may see it (its tenant's); else BuildNotFound, as
        for a build that does not exist: another tenant's ids are not confirmed."""
        state = await self.client.get(build_id)
        if state.request is None or state.request.tenant != token.tenant_name:
            raise BuildNotFound(build_id)
        return state

    async def aclose(self) -> None:
        self.stopping.set()
        await self.hub.aclose()
