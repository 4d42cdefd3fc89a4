from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    """The operator console: the admin dashboard, the REST API under /api/ and config export/import."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "console"
