"""A small Label Studio REST client (httpx), enough for the labeling loop; no SDK dependency.

Tokens: a legacy API token is sent as ``Authorization: Token``; a Personal Access Token (a JWT) is a
refresh token, exchanged at ``/api/token/refresh/`` for a short-lived access token sent as ``Bearer``.
Every failure becomes a LabelStudioError that says what to do. Task images are fetched from this Label
Studio only (its own origin, no redirects followed), so neither the token nor a request ever goes elsewhere.
"""
from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Iterator
from xml.sax.saxutils import quoteattr

import httpx

FROM_NAME, TO_NAME = "label", "image"


class LabelStudioError(Exception):
    """Label Studio refused or could not be reached; nothing was changed on our side."""


def label_config(classes: list[dict]) -> str:
    """BrushLabels project config generated from classes.json (names and colours)."""
    labels = "\n".join(f'    <Label value={quoteattr(c["name"])} background="#{c["color"][0]:02x}{c["color"][1]:02x}{c["color"][2]:02x}"/>'
                       for c in classes)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true" zoomControl="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>\n</View>')


def _is_jwt(token: str) -> bool:
    parts = token.split(".")
    if len(parts) != 3:
        return False
    try:
        json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        return True
    except ValueError:
        return False


def _origin(url: httpx.URL) -> tuple:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


# A server that does not accept the connection within CONNECT_TIMEOUT is down; one that accepts but does
# not answer within READ_TIMEOUT is hung. Either fails the action at once instead of after half a minute.
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 20.0


class LabelStudio:
    def __init__(self, url: str, token: str, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT):
        if not url or not token:
            raise LabelStudioError("give the Label Studio URL and an API token (Account & Settings -> Access Token).")
        self.url = url.rstrip("/")
        self.token = token
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
                                  follow_redirects=True)
        self._access: tuple[str, float] | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LabelStudio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _auth(self) -> dict:
        if not _is_jwt(self.token):
            return {"Authorization": f"Token {self.token}"}
        if self._access is None or self._access[1] < time.time():
            r = self._send("POST", "/api/token/refresh/", json={"refresh": self.token}, auth=False)
            self._access = (r.json()["access"], time.time() + 240)
        return {"Authorization": f"Bearer {self._access[0]}"}

    def _send(self, method: str, path: str, auth: bool = True, **kwargs) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), **(self._auth() if auth else {})}
        try:
            r = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TimeoutException as err:
            limit = self._http.timeout.connect if isinstance(err, httpx.ConnectTimeout) else self._http.timeout.read
            raise LabelStudioError(f"Label Studio at {self.url} did not answer within {limit:g} s ({type(err).__name__} on "
                                   f"{method} {path}). Check that it is running and not overloaded; nothing was changed, "
                                   "retry later.") from None
        except httpx.HTTPError as err:
            raise LabelStudioError(f"Label Studio is not reachable at {self.url} ({type(err).__name__}: {err}). "
                                   "Check that it is running and the URL is right; nothing was changed, retry later.") from None
        if r.status_code in (401, 403):
            raise LabelStudioError(f"Label Studio at {self.url} rejected the token ({r.status_code}: {r.text[:200]}). "
                                   "Copy the access token from Account & Settings; legacy tokens must be enabled "
                                   "for the organisation (LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on first start).")
        if r.status_code >= 400:
            raise LabelStudioError(f"Label Studio {method} {path} failed with {r.status_code}: {r.text[:500]}")
        return r

    def same_origin(self, url: str) -> str | None:
        """``url`` (a path, or an absolute URL) as an absolute URL if it is on this Label Studio, else None."""
        base = httpx.URL(self.url)
        try:
            target = base.join(url)
        except httpx.InvalidURL:
            return None
        return str(target) if _origin(target) == _origin(base) else None

    def fetch(self, url: str, max_bytes: int) -> bytes:
        """The bytes at ``url`` on this Label Studio (a task's image), refused as soon as more than ``max_bytes``
        arrive; ValueError for a URL elsewhere or a file too large, LabelStudioError when Label Studio fails."""
        target = self.same_origin(url)
        if target is None:
            raise ValueError(f"its image {url[:200]} is not on Label Studio at {self.url}; scaleseg fetches task images "
                             "only from the Label Studio it reads. Import the image into the project instead")
        try:
            with self._http.stream("GET", target, headers=self._auth(), follow_redirects=False) as r:
                if r.status_code != 200:
                    raise LabelStudioError(f"Label Studio GET {url[:200]} answered {r.status_code}"
                                           + (" (a redirect, not followed)" if r.is_redirect else "")
                                           + ". Check that the image is still in the project.")
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise ValueError(f"its image {url[:200]} is more than {max_bytes:,} bytes (the per-image limit)")
                    chunks.append(chunk)
        except httpx.HTTPError as err:
            raise LabelStudioError(f"Label Studio at {self.url} failed while sending {url[:200]} ({type(err).__name__}: "
                                   f"{err}); nothing was changed, retry later.") from None
        return b"".join(chunks)

    def request(self, method: str, path: str, **kwargs):
        r = self._send(method, path, **kwargs)
        return r.json() if r.content else None

    # --- API ---------------------------------------------------------------------------------------
    def whoami(self) -> dict:
        return self.request("GET", "/api/current-user/whoami")

    def projects(self) -> list[dict]:
        out = self.request("GET", "/api/projects", params={"page_size": 1000})
        return out["results"] if isinstance(out, dict) else out

    def project(self, key: str) -> dict:
        """The project with this id or title; LabelStudioError naming the projects there are."""
        projects = self.projects()
        found = [p for p in projects if str(p["id"]) == str(key)] or [p for p in projects if p["title"] == key]
        if not found:
            names = ", ".join(f"{p['id']} ({p['title']!r})" for p in projects) or "none"
            raise LabelStudioError(f"Label Studio at {self.url} has no project {key!r}; its projects are: {names}.")
        return found[0]

    def export(self, project_id: int) -> list[dict]:
        """Every task of the project with its annotations: Label Studio's own JSON export."""
        return self.request("GET", f"/api/projects/{project_id}/export",
                            params={"exportType": "JSON", "download_all_tasks": "true"})

    def ensure_project(self, title: str, classes: list[dict]) -> dict:
        """The project of that title (its labels updated to classes.json), created if missing."""
        config = label_config(classes)
        for project in self.projects():
            if project["title"] == title:
                if project.get("label_config", "").strip() != config:
                    project = self.request("PATCH", f"/api/projects/{project['id']}", json={"label_config": config})
                return project
        return self.request("POST", "/api/projects", json={"title": title, "label_config": config,
                                                           "description": "scaleseg active labeling",
                                                           "sampling": "Uncertainty sampling",
                                                           "show_collab_predictions": True})

    def ensure_local_storage(self, project_id: int, folder: Path) -> dict:
        """A local-files import storage for ``folder`` (Label Studio serves those files only if one exists)."""
        folder = str(Path(folder).resolve())
        for storage in self.request("GET", "/api/storages/localfiles", params={"project": project_id}):
            if storage.get("path") == folder:
                return storage
        return self.request("POST", "/api/storages/localfiles", json={
            "project": project_id, "path": folder, "title": "scaleseg images", "use_blob_urls": True,
            "regex_filter": r".*\.(png|jpe?g)$"})

    def upload_image(self, project_id: int, path: Path) -> str:
        """Upload one image file; returns the URL tasks use to reference it."""
        with open(path, "rb") as fh:
            out = self.request("POST", f"/api/projects/{project_id}/import", params={"commit_to_project": "false"},
                               files={"file": (path.name, fh, "image/png" if path.suffix == ".png" else "image/jpeg")})
        upload_ids = out.get("file_upload_ids") or []
        if not upload_ids:
            raise LabelStudioError(f"Label Studio did not accept the upload of {path}: {out}")
        upload = self.request("GET", f"/api/import/file-upload/{upload_ids[0]}")
        return "/data/" + upload["file"].lstrip("/")

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        out = self.request("POST", f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, json=tasks)
        ids = out.get("task_ids")
        if ids is None or len(ids) != len(tasks):
            raise LabelStudioError(f"Label Studio imported {out.get('task_count')} of {len(tasks)} tasks: {out}")
        return ids

    def tasks(self, project_id: int) -> Iterator[dict]:
        page = 1
        while True:
            out = self.request("GET", "/api/tasks", params={"project": project_id, "fields": "all", "page": page, "page_size": 100})
            batch = out["tasks"] if isinstance(out, dict) else out
            yield from batch
            if len(batch) < 100:
                return
            page += 1

    def create_annotation(self, task_id: int, result: list[dict], cancelled: bool = False) -> dict:
        return self.request("POST", f"/api/tasks/{task_id}/annotations", json={"result": result, "was_cancelled": cancelled})
