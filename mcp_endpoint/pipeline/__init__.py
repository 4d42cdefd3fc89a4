"""The path of one forwarded call, step by step.

`flow.py` calls the steps in order and returns one `Outcome` (values.py):

1. admit.py      loops and rate limits
2. connect.py    the user's own account at a per-user OAuth peer
3. decide.py     policy, grants and consent (asking.py: the prompts; continuation.py: approved rounds)
4. exchange.py   the upstream request: envelope.py (what is sent), host.py (requests to the host),
                 upstream_requests.py (the upstream's sampling/elicitation, gated),
                 home_consent.py (a peer gateway's consent question, asked here or at the user's home)
5. record.py     the audit row

Each step is a leaf: it never imports flow.py, and imports only its siblings' public names.
"""
