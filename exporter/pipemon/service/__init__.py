"""The exporter service: request handling, ingest, authorisation, the recorder and the exposition."""
