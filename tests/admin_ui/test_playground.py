"""The admin's "Try it" playground: a call made as the signed-in admin through the whole gateway
(dispatcher, policy, consent, audit), with a form built from the item's input schema."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from federation.models import CatalogEntry
from identity.consent.prompts import consent_prompt_answer
from identity.models import AuditEvent, ConsentPolicy, ConsentPrompt
from tests.admin_ui.common import STAFF, staff_client
from tests.base import HOST, FixturePeerTestCase, persona


class PlaygroundTest(FixturePeerTestCase):
    async def post(self, upstream_name: str, data: dict[str, Any], kind: str = "tool") -> Any:
        entry = await CatalogEntry.objects.aget(peer=self.peer, kind=kind, upstream_name=upstream_name)
        admin = await sync_to_async(staff_client)()
        return await sync_to_async(admin.post)(f"/admin/playground/{entry.pk}/", data)

    def test_the_list_offers_every_visible_item_and_the_form_follows_the_schema(self) -> None:
        client = staff_client()
        listing = client.get("/admin/playground/").content.decode()
        assert "everything__add" in listing
        entry = CatalogEntry.objects.get(peer=self.peer, kind="tool", upstream_name="add")
        page = client.get(f"/admin/playground/{entry.pk}/").content.decode()
        for argument in entry.payload["inputSchema"]["properties"]:
            assert f'name="arg_{argument}"' in page

    async def test_a_tool_call_runs_as_the_admin_and_is_audited_with_its_timing(self) -> None:
        reply = await self.post("add", {"arg_a": "2", "arg_b": "3"})

        assert reply.status_code == 200
        page = reply.content.decode()
        assert 'data-outcome="ok"' in page, page[-3000:]
        assert "5" in "".join(reply.context["outcome"].texts())
        assert reply.context["outcome"].elapsed_ms > 0
        event = await AuditEvent.objects.aget(peer="everything", name="add")
        assert event.username == STAFF and event.outcome == "ok"
        assert event.client_id  # the playground's own client, as policies and consent see it

    async def test_a_wrong_type_is_a_form_error_and_no_call(self) -> None:
        reply = await self.post("add", {"arg_a": "two", "arg_b": "3"})

        assert reply.context["outcome"] is None
        assert reply.context["form"].errors["arg_a"]
        assert not await AuditEvent.objects.filter(name="add").aexists()

    async def test_a_policy_that_refuses_refuses_the_admin_too(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", name_pattern="add", decision="deny")
        reply = await self.post("add", {"arg_a": "1", "arg_b": "1"})

        assert 'data-outcome="error"' in reply.content.decode()
        assert reply.context["outcome"].error["code"] == -32017
        assert (await AuditEvent.objects.aget(name="add")).decision == "deny"

    async def test_a_call_that_needs_consent_links_the_consent_page(self) -> None:
        with override_settings(FEDMCP_CONSENT_DEFAULT="ask"):
            reply = await self.post("add", {"arg_a": "1", "arg_b": "1"})

        outcome = reply.context["outcome"]
        assert outcome.consent_url and "/consent/" in outcome.consent_url
        prompt = await ConsentPrompt.objects.aget()
        assert prompt.username == STAFF
        assert 'id="playground-consent"' in reply.content.decode()

    async def test_after_approving_on_the_consent_page_continue_finishes_the_call(self) -> None:
        with override_settings(FEDMCP_CONSENT_DEFAULT="ask"):
            asked = await self.post("add", {"arg_a": "40", "arg_b": "2"})
            state = asked.context["outcome"].request_state
            assert state and 'id="playground-continue"' in asked.content.decode()
            prompt = await ConsentPrompt.objects.aget()
            operator = await sync_to_async(get_user_model().objects.get)(username=STAFF)
            await sync_to_async(consent_prompt_answer)(prompt_id=prompt.id, user=operator, approve=True)

            done = await self.post("add", {"arg_a": "40", "arg_b": "2", "requestState": state, "continue": "1"})

        outcome = done.context["outcome"]
        assert not outcome.error and "42" in "".join(outcome.texts()), outcome.reply
        assert await AuditEvent.objects.filter(name="add", decision="approved", outcome="ok").aexists()

    async def test_a_prompt_and_a_resource_can_be_tried(self) -> None:
        prompt = await CatalogEntry.objects.filter(peer=self.peer, kind="prompt").afirst()
        resource = await CatalogEntry.objects.filter(peer=self.peer, kind="resource").afirst()
        assert prompt is not None and resource is not None
        admin = await sync_to_async(staff_client)()
        required = {f"arg_{a['name']}": "x" for a in prompt.payload.get("arguments") or [] if a.get("required")}

        got = await sync_to_async(admin.post)(f"/admin/playground/{prompt.pk}/", required)
        read = await sync_to_async(admin.post)(f"/admin/playground/{resource.pk}/", {})

        assert got.context["outcome"].method == "prompts/get" and not got.context["outcome"].error, got.context["outcome"].reply
        assert read.context["outcome"].method == "resources/read" and not read.context["outcome"].error, read.context["outcome"].reply

    def test_it_is_for_staff_only(self) -> None:
        entry = CatalogEntry.objects.get(peer=self.peer, kind="tool", upstream_name="add")
        user = Client(headers={"host": HOST})
        user.force_login(persona("alice"))
        assert user.get("/admin/playground/").status_code == 302
        assert user.post(f"/admin/playground/{entry.pk}/", {"arg_a": "1", "arg_b": "1"}).status_code == 302
        assert not AuditEvent.objects.exists()
