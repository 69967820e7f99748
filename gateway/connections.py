"""Operations on stored connections shared by the CLI, the dashboard and the admin API."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.config import ProviderConfig
from gateway.oauth.client import OAuthClient
from gateway.store.base import Store

log = logging.getLogger("gateway.connections")


@dataclass(frozen=True, slots=True)
class RevokeOutcome:
    existed: bool
    revoked_at_provider: bool
    note: str  # one sentence for people: what happened at the provider


async def revoke_connection(store: Store, oauth: OAuthClient, provider: ProviderConfig | None,
                            identity_id: int, provider_name: str) -> RevokeOutcome:
    """Revoke at the provider (RFC 7009: refresh token first, it takes the access token with
    it at most servers), then forget the tokens even when the provider cannot be reached."""
    conn = await store.get_connection(identity_id, provider_name)
    if conn is None:
        return RevokeOutcome(False, False, "there was no connection")
    revoked, note = False, ("the provider has no revocation endpoint; tokens forgotten locally"
                            if provider is not None else
                            "the provider is no longer configured; tokens forgotten locally")
    if provider is not None and provider.revocation_url is not None:
        revoked = True
        for token, hint in ((conn.tokens.refresh_token, "refresh_token"),
                            (conn.tokens.access_token, "access_token")):
            if token is None:
                continue
            err = await oauth.revoke(provider, token, hint)
            if err is not None:
                revoked = False
                log.warning("revocation at %s failed: %s", provider_name, err.error)
        note = ("revoked at the provider" if revoked else
                "the provider could not be reached or refused; tokens forgotten locally anyway")
    await store.delete_connection(identity_id, provider_name)
    return RevokeOutcome(True, revoked, note)
