"""Alerting on anomaly events: the signed webhook (``meterline.alerts.webhook``)."""
