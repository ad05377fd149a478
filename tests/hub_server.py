"""A small Hugging Face Hub look-alike for tests, serving on 127.0.0.1 from memory.

No machine here reaches the real Hub, and no package provides a local one. This answers the endpoints that
`create_repo`, `upload_folder` / `push_to_hub` (regular uploads, no LFS/Xet) and `from_pretrained` /
`hf_hub_download` use, which is enough to push a model and load it back in another process:

    POST /api/repos/create                     create a repository (409 if it exists)
    POST /api/validate-yaml                    accept any model card metadata
    GET  /api/whoami-v2                        a fixed user
    POST /api/models/{repo}/preupload/{rev}    every file "regular" (inline in the commit)
    POST /api/models/{repo}/commit/{rev}       ndjson: a header line, then base64 files
    GET  /api/models/{repo}[/revision/{rev}]   repository info with its files
    GET  /api/models/{repo}/tree/{rev}         file listing
    POST /api/models/{repo}/paths-info/{rev}   info on given paths
    HEAD/GET /{repo}/resolve/{rev}/{file}      file download (404 + X-Error-Code: EntryNotFound if missing)

Use `HubServer()` as a context manager; clients must get `HF_ENDPOINT=server.url` before importing
huggingface_hub (so tests push and load in subprocesses).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

USER = "test-user"


class Repository:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = ["0" * 40]

    @property
    def sha(self) -> str:
        return self.commits[-1]

    def commit(self, files: dict[str, bytes], deleted: list[str], message: str) -> str:
        self.files.update(files)
        for path in deleted:
            self.files.pop(path, None)
        digest = hashlib.sha1((self.sha + message + json.dumps(sorted(self.files))).encode())
        for path in sorted(files):
            digest.update(files[path])
        self.commits.append(digest.hexdigest())
        return self.sha


class HubHandler(BaseHTTPRequestHandler):
    server: HubHTTPServer

    def log_message(self, *args):  # quiet
        pass

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _reply(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _repo(self, repo_id: str) -> Repository | None:
        return self.server.repos.get(repo_id)

    def _not_found(self, code: str = "RepoNotFound", head: bool = False):
        self._reply(404, {"error": code}, {"X-Error-Code": code, "X-Error-Message": code}, head=head)

    def _file_entry(self, path: str, data: bytes) -> dict:
        return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

    def _info(self, repo_id: str, repo: Repository) -> dict:
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.sha,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": path} for path in sorted(repo.files)],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
        }

    # --- routes ----------------------------------------------------------------------------------------------------

    def do_HEAD(self):
        self._download(head=True)

    def do_GET(self):
        path = unquote(urlparse(self.path).path)
        if path == "/api/whoami-v2":
            return self._reply(
                200, {"name": USER, "type": "user", "orgs": [], "auth": {"accessToken": {"role": "write"}}}
            )
        match = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(/.*)?", path)
        if match:
            repo = self._repo(match[1])
            if repo is None:
                return self._not_found()
            prefix = (match[3] or "").strip("/")
            entries = [self._file_entry(p, d) for p, d in sorted(repo.files.items()) if p.startswith(prefix)]
            return self._reply(200, entries)
        match = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
        if match:
            repo = self._repo(match[1])
            return self._reply(200, self._info(match[1], repo)) if repo else self._not_found()
        self._download(head=False)

    def _download(self, head: bool):
        path = unquote(urlparse(self.path).path)
        match = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if not match:
            return self._reply(404, {"error": f"unknown route {path}"}, head=head)
        repo = self._repo(match[1])
        if repo is None:
            return self._not_found(head=head)
        data = repo.files.get(match[3])
        if data is None:
            return self._not_found("EntryNotFound", head=head)
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        headers = {"X-Repo-Commit": repo.sha, "ETag": etag, "Content-Type": "application/octet-stream"}
        self._reply(200, data, headers, head=head)

    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if path == "/api/repos/create":
            request = json.loads(body or b"{}")
            name = request["name"]
            repo_id = f"{request['organization']}/{name}" if request.get("organization") else f"{USER}/{name}"
            if repo_id in self.server.repos:
                return self._reply(409, {"error": "You already created this model repo", "url": self._url(repo_id)})
            self.server.repos[repo_id] = Repository()
            return self._reply(200, {"url": self._url(repo_id), "name": repo_id})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/(.+?)/preupload/([^/]+)", path)
        if match:
            if self._repo(match[1]) is None:
                return self._not_found()
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        match = re.fullmatch(r"/api/models/(.+?)/paths-info/([^/]+)", path)
        if match:
            repo = self._repo(match[1])
            if repo is None:
                return self._not_found()
            wanted = re.findall(r"paths=([^&]+)", body.decode()) or json.loads(body or b"{}").get("paths", [])
            wanted = [unquote(p) for p in wanted]
            return self._reply(200, [self._file_entry(p, repo.files[p]) for p in wanted if p in repo.files])
        match = re.fullmatch(r"/api/models/(.+?)/commit/([^/]+)", path)
        if match:
            repo = self._repo(match[1])
            if repo is None:
                return self._not_found()
            files, deleted, message = {}, [], ""
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    message = value.get("summary", "")
                elif item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    deleted.append(value["path"])
                else:
                    return self._reply(400, {"error": f"unsupported commit operation {item['key']} (no LFS here)"})
            sha = repo.commit(files, deleted, message)
            return self._reply(200, {"commitUrl": f"{self._url(match[1])}/commit/{sha}", "commitOid": sha})
        self._reply(404, {"error": f"unknown route {path}"})

    def _url(self, repo_id: str) -> str:
        return f"{self.server.url}/{repo_id}"


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos: dict[str, Repository] = {}
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    """`with HubServer() as hub:` serves in a background thread; `hub.url`, `hub.repos`."""

    def __enter__(self) -> HubHTTPServer:
        self.server = HubHTTPServer()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.server

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
