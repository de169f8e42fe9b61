"""The local stack (`pipemon stack`): process supervision, demo traffic, the sink, local PostgreSQL."""
