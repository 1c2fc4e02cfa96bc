"""Invoicing export: rated lines -> Stripe, Chargebee, a signed webhook or files, exactly once
at the target by idempotency key (docs/export.md).

- ``items``: the item a target receives and its answer (the shared interface);
- ``build``: rated lines -> items, canonical JSON and content hash;
- ``ledger``: per-item state in SQLite, the kill -9 protocol;
- ``engine``: enqueue, claim, send in bounded-concurrency batches, apply outcomes;
- ``files_target``, ``webhook_target`` (+ ``signed_http``), ``stripe_target``,
  ``chargebee_target``: the targets;
- ``reconcile``: rated vs ledger vs what the target received;
- ``commands``: ``meterline export`` and the settings it validates.
"""
