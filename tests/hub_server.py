"""A Hub on loopback for the one wire test of `ebt push`: the routes of the Hub's HTTP API that the stock
huggingface_hub client calls to create a repo, upload a folder of regular (non-LFS) files to `main` and download them.

Point a child process at it with `HF_ENDPOINT=hub.endpoint` in its environment (huggingface_hub reads it at import):
nothing of the client is patched. One repository, one branch, files kept in memory; `requests` records the method,
the path and whether a bearer token was sent (never its value).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API = r"/api/models/(?P<repo>[^/]+/[^/]+)"
ROUTES = [("POST", "create", r"/api/repos/create"), ("POST", "validate-yaml", r"/api/validate-yaml"),
          ("GET", "info", API + r"(/revision/main)?"), ("GET", "tree", API + r"/tree/main"),
          ("POST", "preupload", API + r"/preupload/main"), ("POST", "commit", API + r"/commit/main"),
          ("GET HEAD", "resolve", r"/(?P<repo>[^/]+/[^/]+)/resolve/[^/]+/(?P<path>.+)")]


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LoopbackHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.files: dict[str, bytes] = {}
        self.commit_sha = "0" * 40
        self.requests: list[tuple[str, str, bool]] = []

    def __enter__(self) -> LoopbackHub:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def answer(self, kind: str, match: re.Match, body: bytes):
        """(status, headers, payload) of one request."""
        if kind == "create":
            request = json.loads(body)
            return 200, {}, {"url": f"{self.endpoint}/{request.get('organization')}/{request['name']}"}
        if kind == "validate-yaml":
            return 200, {}, {"errors": [], "warnings": []}
        if kind == "info":
            return 200, {}, {"id": match["repo"], "sha": self.commit_sha, "private": False,
                             "siblings": [{"rfilename": p} for p in sorted(self.files)]}
        if kind == "tree":
            return 200, {}, [{"type": "file", "path": p, "oid": git_oid(d), "size": len(d)}
                             for p, d in sorted(self.files.items())]
        if kind == "preupload":
            return 200, {}, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in json.loads(body)["files"]]}
        if kind == "commit":
            return 200, {}, self.commit(match["repo"], body)
        if match["path"] not in self.files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit_sha}, {"error": "not found"}
        data = self.files[match["path"]]
        return 200, {"ETag": f'"{git_oid(data)}"', "X-Repo-Commit": self.commit_sha}, data

    def commit(self, repo: str, body: bytes) -> dict:
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                del self.files[item["value"]["path"]]
        self.commit_sha = hashlib.sha1(self.commit_sha.encode() + body).hexdigest()
        return {"commitOid": self.commit_sha, "commitUrl": f"{self.endpoint}/{repo}/commit/{self.commit_sha}"}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.split("?")[0]
        route = next(((kind, m) for methods, kind, pattern in ROUTES
                      if self.command in methods.split() and (m := re.fullmatch(pattern, path))), None)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, path, self.headers.get("Authorization", "").startswith("Bearer ")))
        status, headers, payload = self.server.answer(*route, body) if route else (404, {}, {"error": path})
        payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Length": str(len(payload)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_HEAD = do_POST = do_GET

    def log_message(self, *args) -> None:  # quiet test output
        pass
