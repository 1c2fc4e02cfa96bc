"""The OpenAPI 3.1 document served at ``/api/v1/openapi.json`` (checked in tests with
openapi-spec-validator). Meter names are listed as the ``meter`` enum, from the registry
the server runs with."""

from __future__ import annotations

from typing import Any

from meterline.core.meters import MeterRegistry

_PROBLEM = {"$ref": "#/components/responses/Problem"}


def _problem_responses(*codes: int) -> dict[str, Any]:
    return {str(c): _PROBLEM for c in codes}


def document(registry: MeterRegistry, version: str) -> dict[str, Any]:
    meters = registry.names
    path_params = [
        {"name": "customer", "in": "path", "required": True,
         "schema": {"type": "string", "minLength": 1, "maxLength": 256},
         "description": "Your customer id (percent-encode '/', '?', '#', '%')."},
        {"name": "meter", "in": "path", "required": True,
         "schema": {"type": "string", "enum": meters}},
    ]
    ingest_errors = _problem_responses(400, 401, 403, 413, 415, 503)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Meterline", "version": version,
                 "description": "Usage ingest (OpenMeter CloudEvents, Lago, native envelope), "
                                "usage queries and quota checks. Quantities are exact "
                                "decimal strings."},
        "security": [{"apiKey": []}],
        "paths": {
            "/api/v1/events": {"post": {
                "operationId": "ingestEvents",
                "summary": "Ingest CloudEvents (OpenMeter) or one Lago event",
                "description": "204 once every event is durable (local log committed or "
                               "Kafka acks=all). All or nothing: any invalid event rejects "
                               "the request with every invalid event listed by index.",
                "requestBody": {"required": True, "content": {
                    "application/cloudevents+json": {
                        "schema": {"$ref": "#/components/schemas/CloudEvent"}},
                    "application/cloudevents-batch+json": {
                        "schema": {"type": "array", "minItems": 1,
                                   "items": {"$ref": "#/components/schemas/CloudEvent"}}},
                    "application/json": {"schema": {"oneOf": [
                        {"$ref": "#/components/schemas/CloudEvent"},
                        {"type": "array", "items": {"$ref": "#/components/schemas/CloudEvent"}},
                        {"type": "object", "required": ["event"], "properties": {
                            "event": {"$ref": "#/components/schemas/LagoEvent"}}},
                    ]}},
                }},
                "responses": {"204": {"description": "durable"},
                              "200": {"description": "durable (Lago body)", "content": {
                                  "application/json": {"schema": {"type": "object"}}}},
                              **ingest_errors},
            }},
            "/api/v1/events/batch": {"post": {
                "operationId": "ingestLagoBatch", "summary": "Ingest a Lago batch",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["events"], "properties": {
                        "events": {"type": "array", "minItems": 1, "items": {
                            "$ref": "#/components/schemas/LagoEvent"}}}}}}},
                "responses": {"200": {"description": "durable", "content": {
                    "application/json": {"schema": {"type": "object"}}}}, **ingest_errors},
            }},
            "/api/v1/batches": {"post": {
                "operationId": "ingestEnvelope",
                "summary": "Ingest one native batch envelope (docs/envelope.md)",
                "requestBody": {"required": True, "content": {
                    "application/vnd.meterline.envelope+json": {"schema": {"type": "object"}},
                    "application/json": {"schema": {"type": "object"}}}},
                "responses": {"200": {"description": "durable", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        "accepted": {"type": "integer"}}}}}}, **ingest_errors},
            }},
            "/api/v1/usage/{customer}/{meter}": {"get": {
                "operationId": "getUsage",
                "summary": "Usage per window and dimension group, from the rollups",
                "parameters": [*path_params,
                               {"name": "granularity", "in": "query",
                                "schema": {"type": "string", "enum": ["hour", "day", "month"],
                                           "default": "hour"}},
                               {"name": "from", "in": "query", "schema": {"type": "string"},
                                "description": "RFC 3339 or UTC ms; windows starting at or "
                                               "after it"},
                               {"name": "to", "in": "query", "schema": {"type": "string"},
                                "description": "RFC 3339 or UTC ms; windows starting before "
                                               "it (default: now)"}],
                "responses": {"200": {"description": "usage", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Usage"}}}},
                    **_problem_responses(400, 401, 403, 404, 422)},
            }},
            "/api/v1/quota/{customer}/{meter}": {"get": {
                "operationId": "getQuota",
                "summary": "Limit, used and remaining in the current period",
                "parameters": path_params,
                "responses": {"200": {"description": "quota", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Quota"}}}},
                    **_problem_responses(400, 401, 403, 404, 422)},
            }},
            "/api/v1/usage-links": {"post": {
                "operationId": "createUsageLink",
                "summary": "A signed, expiring link to one customer's usage page (/usage)",
                "description": "The link names the key that made it: revoking the key "
                               "revokes the link. Join `path` to the server's address.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["customer"], "properties": {
                        "customer": {"type": "string"},
                        "expires_in_s": {"type": "integer", "minimum": 1,
                                         "maximum": 31 * 86400, "default": 7 * 86400}}}}}},
                "responses": {"200": {"description": "the link", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        "customer": {"type": "string"}, "path": {"type": "string"},
                        "expires": {"type": "string", "format": "date-time"}}}}}},
                    **_problem_responses(400, 401, 403)},
            }},
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "ml_<id>_<secret>, from "
                                                          "`meterline keys create`"}},
            "responses": {"Problem": {"description": "RFC 9457 problem", "content": {
                "application/problem+json": {"schema": {
                    "$ref": "#/components/schemas/Problem"}}}}},
            "schemas": {
                "Decimal": {"type": "string", "pattern": r"^-?\d+(\.\d{1,9})?$"},
                "CloudEvent": {"type": "object",
                               "required": ["specversion", "id", "source", "type", "subject"],
                               "properties": {
                                   "specversion": {"const": "1.0"},
                                   "id": {"type": "string"}, "source": {"type": "string"},
                                   "type": {"type": "string", "enum": meters},
                                   "subject": {"type": "string"},
                                   "time": {"type": "string", "format": "date-time"},
                                   "data": {"type": ["object", "null"]}}},
                "LagoEvent": {"type": "object", "required": ["transaction_id", "code"],
                              "properties": {
                                  "transaction_id": {"type": "string"},
                                  "external_subscription_id": {"type": "string"},
                                  "external_customer_id": {"type": "string"},
                                  "code": {"type": "string", "enum": meters},
                                  "timestamp": {"type": ["integer", "number", "string"]},
                                  "properties": {"type": "object"}}},
                "Usage": {"type": "object", "properties": {
                    "customer": {"type": "string"}, "meter": {"type": "string"},
                    "unit": {"type": "string"}, "aggregation": {"type": "string"},
                    "granularity": {"type": "string"},
                    "from": {"type": "string", "format": "date-time"},
                    "to": {"type": "string", "format": "date-time"},
                    "data": {"type": "array", "items": {"type": "object", "properties": {
                        "window_start": {"type": "string", "format": "date-time"},
                        "window_end": {"type": "string", "format": "date-time"},
                        "window_start_ms": {"type": "integer"},
                        "window_end_ms": {"type": "integer"},
                        "dimensions": {"type": "object",
                                       "additionalProperties": {"type": "string"}},
                        "value": {"$ref": "#/components/schemas/Decimal"},
                        "events": {"type": "integer"}}}}}},
                "Quota": {"type": "object", "properties": {
                    "customer": {"type": "string"}, "meter": {"type": "string"},
                    "unit": {"type": "string"},
                    "period": {"type": "string", "enum": ["day", "month"]},
                    "period_start": {"type": "string", "format": "date-time"},
                    "period_end": {"type": "string", "format": "date-time"},
                    "limit": {"$ref": "#/components/schemas/Decimal"},
                    "used": {"$ref": "#/components/schemas/Decimal"},
                    "remaining": {"$ref": "#/components/schemas/Decimal"},
                    "exceeded": {"type": "boolean"}}},
                "Problem": {"type": "object", "required": ["type", "title", "status"],
                            "properties": {
                                "type": {"type": "string"}, "title": {"type": "string"},
                                "status": {"type": "integer"}, "detail": {"type": "string"},
                                "errors": {"type": "array", "items": {
                                    "type": "object", "properties": {
                                        "index": {"type": "integer"},
                                        "field": {"type": "string"},
                                        "message": {"type": "string"}}}}}},
            },
        },
    }
