"""The web UI for people, served by the exporter: an overview of every pipeline and a page per pipeline.

`install(app, ...)` adds its routes; views.py holds the handlers, overview.py and pipeline.py the pages,
svg.py the charts, alerts.py the Alertmanager client, access.py the read protection.
"""

from pipemon.web.views import UI_KEY, Ui, install

__all__ = ["UI_KEY", "Ui", "install"]
