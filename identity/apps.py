from django.apps import AppConfig


class IdentityConfig(AppConfig):
    name = "identity"
    verbose_name = "Identity, consent and audit"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.contrib.auth.models import Group
        from oauth2_provider.models import AccessToken, Application

        from fedmcp_lib import metrics
        from fedmcp_lib.caching import bump_on_change, bump_on_m2m_change
        from identity.consent.prompts import pending_prompts_metric
        from identity.models import ConsentGrant, ConsentPolicy, TrustedGateway

        # What each cached domain depends on here (fedmcp_lib/caching.py); a new token is a miss.
        user = get_user_model()
        bump_on_change(AccessToken, "tokens", skip_created=True)
        bump_on_change(Application, "tokens", skip_created=True)
        bump_on_change(user, "tokens", "consent", skip_created=True)
        bump_on_change(ConsentPolicy, "consent", "catalog")
        bump_on_change(ConsentGrant, "consent")
        bump_on_change(Group, "consent", skip_created=True)
        bump_on_m2m_change(user.groups.through, "consent")
        # Trusting a gateway is a credential; creating one turns a cached "not trusted" stale.
        # Routes carry whether a peer gateway is believed (federation/router.py), so "catalog" too.
        bump_on_change(TrustedGateway, "tokens", "catalog")
        metrics.register_scrape("fedmcp_consent_prompts_pending", pending_prompts_metric)
