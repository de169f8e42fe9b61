"""Configuration renderers and checks: Prometheus rules, the Alertmanager config, `check-config`."""
