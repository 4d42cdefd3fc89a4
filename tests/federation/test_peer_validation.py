"""Peer validation that the admin, the API and `peer add` share (the model's `clean`)."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.test import TestCase

from federation.models import Peer, Transport


class PerUserOAuthRulesTests(TestCase):
    """The admin and the API validate with the model: the `peer add --user-oauth` rules hold there too."""

    def test_the_model_refuses_what_peer_add_refuses(self) -> None:
        cases = [
            (Peer(name="callback", transport=Transport.STREAMABLE_HTTP, url="http://127.0.0.1:9/mcp", user_oauth=True), "name"),
            (Peer(name="local", transport=Transport.STDIO, command="true", user_oauth=True), "user_oauth"),
            (Peer(name="gw", transport=Transport.STREAMABLE_HTTP, url="http://127.0.0.1:9/mcp", is_gateway=True, user_oauth=True), "user_oauth"),
        ]
        for peer, field in cases:
            with self.subTest(peer=peer.name), self.assertRaises(ValidationError) as caught:
                peer.full_clean()
            self.assertIn(field, caught.exception.message_dict)
        Peer(name="web", transport=Transport.STREAMABLE_HTTP, url="http://127.0.0.1:9/mcp", user_oauth=True).full_clean()
