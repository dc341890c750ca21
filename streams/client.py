"""Asking the running system (the process that owns the chDB directory) over HTTP, for the CLI."""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from streams.settings import Settings

request_timeout_s = 30.0


class NotRunning(RuntimeError):
    pass


def customer_path(customer_id: str, what: str) -> str:
    """The API path of one customer's `what`; the id is one path segment, whatever it holds (`/`, `%`, `?`)."""
    return f"/api/customers/{urllib.parse.quote(customer_id, safe='')}/{what}"


def query_running_system(settings: Settings, path: str, params: dict[str, Any]) -> Any:
    """GET `path` (already quoted: see `customer_path`) from the running system's API."""
    return _request(settings, path, params, None)


def post_running_system(settings: Settings, path: str, body: dict[str, Any]) -> Any:
    return _request(settings, path, {}, json.dumps(body).encode(), timeout_s=3600.0)


def _request(
    settings: Settings, path: str, params: dict[str, Any], body: bytes | None, timeout_s: float = request_timeout_s
) -> Any:
    from streams.runtime import read_run_file

    run = read_run_file(settings)
    if not run:
        raise NotRunning(f"no running system found in {settings.data_dir} (start it with `loyalty up`)")
    url = run["url"] + path + ("?" + urllib.parse.urlencode(params) if params else "")
    headers = {"Authorization": f"Bearer {run['token']}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            reason = json.loads(error.read()).get("error", error.reason)
        except ValueError:
            reason = error.reason
        raise NotRunning(f"{path}: {error.code} {reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        # URLError: no connection. The others come while the answer is awaited or read: the system stopped or was
        # killed during the request (a long `replay --apply`, say), which urllib does not wrap.
        if isinstance(error, urllib.error.URLError):
            message = f"the running system at {run['url']} does not answer ({error.reason})"
        else:
            message = (
                f"the running system at {run['url']} closed the connection before answering {path} "
                f"({type(error).__name__}: {error or 'no answer'})"
            )
            if body is not None:
                message += "; the request may have been carried out in part: see `loyalty status`, then run it again"
        if _gone(run.get("pid")):
            from streams.runtime import run_file_path

            path = run_file_path(settings)
            message += (
                f"; {path} names process {run['pid']}, which is not running here: a `loyalty up` that was killed "
                f"leaves it behind (remove {path} to work offline, or start `loyalty up`)"
            )
        raise NotRunning(message) from None


def _gone(pid: Any) -> bool:
    """Whether `pid` names no process on this host (False when unknown: a run file of another host or container)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's), or cannot be told
        return False
    return False
