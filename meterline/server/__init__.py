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
- ``openapi``   the OpenAPI document served at /api/v1/openapi.json
- ``app``       routes (framework-free) and the ASGI adapter
- ``runtime``   ``meterline serve``: the composition root
"""
