#!/usr/bin/env python3
"""`radloop-healthcheck`: the container health checks of the radloop image (Docker
HEALTHCHECK, Kubernetes exec probes). Exit 0 healthy, 1 not, with one line saying why.

  radloop-healthcheck http URL   a GET below 400 (the review service, MLflow)
  radloop-healthcheck dicom      the gateway's SCP answers an association (C-ECHO); a
                                 rejection counts: the probe is not an allowed caller
  radloop-healthcheck worker     what a worker needs to take a job answers: the database
                                 and the Prefect API

Settings come from the environment, as for every radloop process.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 5.0


def _http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:
        return f"{url}: {type(error).__name__}: {error}"
    return None if status < 400 else f"{url}: HTTP {status}"


def _dicom() -> str | None:
    from radloop.app.probes import probe_dicom
    from radloop.settings import load_settings

    entry = probe_dicom(load_settings())
    return None if entry["healthy"] else f"{entry['url']}: {entry.get('detail', 'no answer')}"


def _worker() -> str | None:
    from sqlalchemy import text

    from radloop.db import make_engine
    from radloop.settings import load_settings

    settings = load_settings()
    engine = make_engine(settings.effective_database_url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:  # any failure to reach the database is "not ready"
        return f"database: {type(error).__name__}"
    finally:
        engine.dispose()
    api = settings.prefect.effective_api_url.rstrip("/")
    return _http(f"{api}/health")


def main(argv: list[str]) -> int:
    if argv[:1] == ["http"] and len(argv) == 2:
        problem = _http(argv[1])
    elif argv == ["dicom"]:
        problem = _dicom()
    elif argv == ["worker"]:
        problem = _worker()
    else:
        sys.stderr.write(__doc__ or "")
        return 2
    if problem is not None:
        sys.stderr.write(f"unhealthy: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
