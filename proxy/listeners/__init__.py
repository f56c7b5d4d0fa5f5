"""The aiohttp listeners, side by side above the payment service: each only translates HTTP to a call of
the service and its outcome back to HTTP.

    agents.py     the agents' listener: every path, in the provider's API shape
    owner_api.py  the owner API and the probes (its own port)
    webhooks.py   signed provider events and real-time card authorizations (on the owner port)
    links.py      one-time approval pages (on the owner port)
"""
