"""What pipemon knows of pipelines: events, the state machine, baselines, schedules, health, registry."""
