"""SHARED_STATE: the gateways of one fleet share their node state through Redis, one of them probing.

``codec`` turns the pool's snapshot into JSON and back (no pickle: Redis is trusted, but a JSON
reader runs nothing it reads); ``store`` is the Redis protocol (the lease and its fencing token,
the published verdicts, drains and breaker openings); ``service`` is what runs in the gateway.
Nothing here is on the request path: it reads the local pool only.
"""
