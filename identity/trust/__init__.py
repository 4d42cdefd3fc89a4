"""Gateway trust: which peer gateways this one believes, and what they assert about their users.

* `gateways.py` trusting a gateway, its keys (JWKS), and checking the identity assertions it sends;
* `signing.py`  this gateway's own signing key, its JWKS, and `jwt_verify`, the one check of every gateway JWT
                (assertions here, remote consent and deferral proofs in identity/consent/);
* `urls.py`     `/.well-known/jwks.json`.
"""
