"""Meterline server: HTTP ingest (OpenMeter, Lago, native envelope), API keys, the usage
query API and quota checks, and ``meterline serve`` which hosts them (and, on the embedded
default, the whole single-machine pipeline) in one process. See docs/server.md.

Layout, one concern per module:

- ``problems``  RFC 9457 problem documents (every error response)
- ``tenancy``   how customers and event ids belong to a tenant (namespacing)
- ``validation``  one event draft -> a validated SDK item (the SDK's own rules)
- ``formats/``  request bodies -> drafts: CloudEvents (OpenMeter), Lago, native envelope
- ``writers``   validated items -> durable (embedded local log or Kafka acks=all)
- ``keys``      API keys: hashed, scoped to a tenant and to ingest / read / admin
- ``usage``     usage and quota reads from the rollup views
- ``quota_totals``  in-memory quota totals the embedded rollup writer keeps current
- ``page``      the self-service usage page (server-rendered HTML + SVG, CSV)
- ``links``     signed, expiring links to one customer's page
- ``kafka_admin``  Kafka reachability and ``meterline topics create``
- ``openapi``   the OpenAPI document served at /api/v1/openapi.json
- ``messages``  Request / Response and the parsing helpers handlers share
- ``ingest_api``  the ingest handlers (OpenMeter, Lago, native)
- ``usage_api``   the usage and quota read handlers (and the customer/meter checks)
- ``page_api``    the usage page and its signed links (handlers)
- ``app``       routing, authentication, the error shape (framework-free); ASGI adapter
- ``runtime``   ``meterline serve``: the composition root
"""
