"""Trust boundaries a request must not cross (SPEC invariants 1 and 2; RFC 9700 §4.9.1).

* A client of one identity never gets another identity's provider token, whatever it sends.
* A token response cannot move a provider's traffic elsewhere (SSRF with the access token):
  ``instance_url`` counts only for a provider that opts in with ``upstream_from_token``, and
  only as an https URL. (Before the fix, any provider's token response could point its
  traffic, bearer token included, at any host.)
"""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.security.conftest import PASSWORD, SecureGateway


async def test_another_identitys_key_never_gets_its_token(secure_gateway: Any) -> None:
    gw: SecureGateway = await secure_gateway()
    await gw.connect_alice(("rec",))
    assert gw.rec is not None
    mallory = await gw.identity("mallory", PASSWORD)
    async with aiohttp.ClientSession() as s:
        for headers in ({"Authorization": f"Bearer {mallory}"},
                        {"Authorization": f"Bearer {mallory}", "X-Identity": "alice",
                         "Cookie": "gateway_session=forged"},
                        {"Proxy-Authorization": f"Bearer {mallory}",
                         "Authorization": "Bearer alice"}):
            async with s.get(gw.url / "rec" / "x", headers=headers) as r:
                assert r.status == 401, headers  # never alice's connection
                if r.headers["Gateway-Error"] == "consent_required":
                    link = (await r.json())["connect_url"]
                else:  # "Bearer alice" is not a key: Authorization wins over Proxy-Auth.
                    assert r.headers["Gateway-Error"] == "unauthenticated"
        async with s.get(gw.url / "rec" / "x", headers=gw.auth_header) as r:
            assert r.status == 200
    assert len(gw.rec.hits) == 1  # only alice's own request reached the upstream
    # The connect link offered to mallory is for mallory: alice's browser cannot use it.
    browser = gw.client()
    await gw.login(browser, "alice", PASSWORD)
    page = await browser.get(link, allow_redirects=False)
    assert page.status == 403


async def test_a_token_response_cannot_redirect_a_providers_traffic(secure_gateway: Any
                                                                     ) -> None:
    gw: SecureGateway = await secure_gateway()
    assert gw.rec is not None and gw.two is not None
    gw.auth.extra_token_fields = {"instance_url": str(gw.two.url / "b" / "stolen")}
    await gw.connect_alice(("rec",))
    async with aiohttp.ClientSession() as s, \
            s.get(gw.url / "rec" / "x", headers=gw.auth_header) as r:
        assert r.status == 200
    assert gw.two.hits == [] and len(gw.rec.hits) == 1


async def test_an_opted_in_provider_still_needs_https(secure_gateway: Any) -> None:
    gw: SecureGateway = await secure_gateway(provider={"upstream_from_token": "instance_url"})
    assert gw.two is not None
    gw.auth.extra_token_fields = {"instance_url": f"http://{gw.two.authority}/b"}
    await gw.connect_alice(("fake",))
    async with aiohttp.ClientSession() as s, \
            s.get(gw.url / "fake" / "x", headers=gw.auth_header) as r:
        assert r.status == 200
    assert gw.two.hits == [] and gw.upstream.hits("x") == 1
