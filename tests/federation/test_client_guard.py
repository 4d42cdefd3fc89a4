"""The outbound guard: which upstream URLs the gateway may connect to."""

from __future__ import annotations

import httpx
from django.test import SimpleTestCase, override_settings

from federation.client import OutboundAddressError, check_url_allowed, outbound_client

PUBLIC = ["http://93.184.216.34/mcp", "https://[2606:2800:220:1:248:1893:25c8:1946]/mcp", "wss://8.8.8.8/ws"]
PRIVATE = [
    "http://10.0.0.5/mcp",
    "http://172.16.3.4/mcp",
    "http://192.168.1.10:8080/mcp",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
    "http://[fe80::1]/mcp",  # IPv6 link-local
    "http://[fd00::1]/mcp",  # IPv6 unique local
    "http://[::ffff:169.254.169.254]/",  # IPv4-mapped metadata address
    "http://0.0.0.0/mcp",
    "http://224.0.0.1/mcp",  # multicast
]
LOOPBACK = [
    "http://127.0.0.1:8765/mcp",
    "http://127.1.2.3/mcp",
    "http://[::1]:8765/mcp",
    "http://[::ffff:127.0.0.1]/mcp",
    "http://localhost:8765/mcp",
    "http://2130706433/mcp",  # 127.0.0.1 written as one decimal number
]
BAD_SCHEMES = [
    "file:///etc/passwd",
    "ftp://93.184.216.34/",
    "gopher://93.184.216.34/",
    "javascript:alert(1)",
    "http:///mcp",
    "mcp",
]


async def verdicts(urls: list[str]) -> dict[str, bool]:
    """Return url -> allowed, so a failure names every URL that got the wrong answer."""
    found = {}
    for url in urls:
        try:
            await check_url_allowed(url)
        except OutboundAddressError:
            found[url] = False
        else:
            found[url] = True
    return found


def every(urls: list[str], allowed: bool) -> dict[str, bool]:
    return dict.fromkeys(urls, allowed)


@override_settings(FEDERATION_ALLOW_LOOPBACK=False, FEDERATION_ALLOW_PRIVATE_IPS=False)
class StrictGuardTests(SimpleTestCase):
    async def test_it_allows_public_addresses(self) -> None:
        self.assertEqual(await verdicts(PUBLIC), every(PUBLIC, True))

    async def test_it_refuses_private_link_local_and_metadata_addresses(self) -> None:
        self.assertEqual(await verdicts(PRIVATE), every(PRIVATE, False))

    async def test_it_refuses_loopback(self) -> None:
        self.assertEqual(await verdicts(LOOPBACK), every(LOOPBACK, False))

    async def test_it_refuses_schemes_other_than_http_and_ws(self) -> None:
        self.assertEqual(await verdicts(BAD_SCHEMES), every(BAD_SCHEMES, False))


@override_settings(FEDERATION_ALLOW_LOOPBACK=True, FEDERATION_ALLOW_PRIVATE_IPS=False)
class LoopbackAllowedTests(SimpleTestCase):
    async def test_it_allows_loopback(self) -> None:
        self.assertEqual(await verdicts(LOOPBACK), every(LOOPBACK, True))

    async def test_private_addresses_stay_refused(self) -> None:
        self.assertEqual(await verdicts(PRIVATE), every(PRIVATE, False))


@override_settings(FEDERATION_ALLOW_LOOPBACK=False, FEDERATION_ALLOW_PRIVATE_IPS=True)
class PrivateAllowedTests(SimpleTestCase):
    async def test_it_allows_private_addresses(self) -> None:
        urls = ["http://10.0.0.5/mcp", "http://192.168.1.10:8080/mcp", "http://[fd00::1]/mcp"]

        self.assertEqual(await verdicts(urls), every(urls, True))

    async def test_loopback_needs_its_own_setting(self) -> None:
        self.assertEqual(await verdicts(LOOPBACK), every(LOOPBACK, False))

    async def test_other_schemes_stay_refused(self) -> None:
        self.assertEqual(await verdicts(BAD_SCHEMES), every(BAD_SCHEMES, False))


class OutboundClientTests(SimpleTestCase):
    async def test_it_sets_explicit_timeouts_and_never_follows_redirects(self) -> None:
        async with outbound_client(connect_timeout=3.0, read_timeout=45.0) as client:
            self.assertEqual(client.timeout, httpx.Timeout(connect=3.0, read=45.0, write=3.0, pool=3.0))
            self.assertFalse(client.follow_redirects)
