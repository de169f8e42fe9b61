"""Take the README's screenshots of the web UI from a running `pipemon stack --demo`.

    python docs/screenshots.py http://127.0.0.1:9464 [--pipeline dbt_marts_nightly]

Writes docs/ui-overview.png and docs/ui-pipeline.png with Debian's headless Chromium (as the browser tests).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

DOCS = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--pipeline", default="dbt_marts_nightly")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--window-size=1400,1000", "--hide-scrollbars"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            for path, out, height in (("/?per=20", "ui-overview.png", 1100),
                                      (f"/pipelines/{args.pipeline}", "ui-pipeline.png", 1900)):
                driver.set_window_size(1400, height)
                driver.get(args.url.rstrip("/") + path)
                time.sleep(1)  # ui.js has turned times into the browser's zone
                driver.save_screenshot(str(DOCS / out))
                print(f"wrote {DOCS / out}")
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
