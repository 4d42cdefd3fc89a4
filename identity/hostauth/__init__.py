"""Host OAuth: this gateway as the authorization server its hosts (MCP clients) get tokens from.

* `oauth_validators.py` the django-oauth-toolkit customisation (audience, scopes, registration rules);
* `tokens.py`           bearer tokens as the MCP transports see them (`authenticate`), and the caller's `Identity`;
* `scopes.py`           the one list of scopes (no Django imports: settings reads it);
* `authorizations.py`   the authorizations a user has given to clients;
* `views.py`, `urls.py` the OAuth endpoints, their discovery documents and the sign-in pages.
"""
