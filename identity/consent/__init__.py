"""Consent: whether a forwarded call, or an upstream's sampling/elicitation request, may go ahead.

The models (ConsentPolicy, ConsentGrant, ConsentPrompt, RemoteConsent, ...) stay in
identity/models.py, where the migrations expect them. docs/CONSENT.md states the rules.

* `policy.py`    the rule (`decide`), reading policies and grants (`decision_load`), the names lists hide,
                 grant revocation, and the `list_changed` a policy change announces;
* `decisions.py` `consent_decide`, the one decision function every call and upstream request goes
                 through (the pipeline's decide step and its relay of sampling/elicitation), cached per worker;
* `prompts.py`   asking the user: prompts, their answers carried to the waiting call, single-use approvals;
* `remote.py`    distributed consent: a peer gateway's signed question to the user's home gateway, and its answer;
* `deferral.py`  sampling/elicitation a gateway further along leaves to the user's home, with its signed proof;
* `upstream_requests.py` what the consent page shows of such a request, and where it comes from;
* `display.py`, `views.py`, `consumers.py`, `urls.py`: the /consent pages and their live feed.
"""
