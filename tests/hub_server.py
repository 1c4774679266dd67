"""A fake Hugging Face Hub HTTP server. TEST FIXTURE ONLY -- not a Hub implementation.

It serves, on 127.0.0.1 only, the subset of the Hub HTTP API that the stock ``huggingface_hub`` client (2.4) and
``transformers`` use to create model repos, commit regular (non-LFS, non-Xet) files, branch, list and download.
Blobs live on disk under ``root/blobs`` (named by git blob sha1), repo metadata in memory (dumped to
``root/repos.json`` after each change). Every commit gets a fresh 40-hex sha; each commit stores the full
``path -> blob`` map of its snapshot. A new repo starts with one commit holding ``.gitattributes``, as on the Hub.

Usage::

    from tests.hub_server import FakeHub

    def test_push(tmp_path):
        with FakeHub(tmp_path / "hub") as hub:  # started on enter, shut down (thread joined) on exit
            api = HfApi(endpoint=hub.endpoint, token="hf_test")
            ...
            assert [r.kind for r in hub.requests if r.method == "POST"] == [...]

The ``fake_hub`` fixture below does the same under ``tmp_path``. To use it, put ``pytest_plugins =
["tests.hub_server"]`` in the test module, or write ``fake_hub = hub_server.fake_hub`` at module level. A plain
``from tests.hub_server import fake_hub`` also works, but ruff then flags the test argument (F811).

Pointing clients at it:

* ``HfApi(endpoint=hub.endpoint, token=...)`` -- simplest, for explicit API calls.
* In-process, for code that uses module-level defaults (``hf_hub_download``, ``snapshot_download``,
  ``from_pretrained``, ``push_to_hub``): ``with hub.patch_client(cache_dir=..., token=...):``. Setting
  ``HF_ENDPOINT`` after import does nothing: ``huggingface_hub.constants`` reads it at import time into
  ``ENDPOINT`` *and* ``HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_url``), the module-level
  ``huggingface_hub.hf_api.api`` instance and ``transformers.utils.hub._hf_api`` cache the endpoint too, and
  ``HF_HUB_OFFLINE`` would block even loopback requests. ``patch_client`` patches all of these and restores them.
  (With ``HF_HUB_OFFLINE=1`` in the environment, explicit ``HfApi(endpoint=...)`` calls are blocked as well: also
  monkeypatch ``huggingface_hub.constants.HF_HUB_OFFLINE`` to False, or work inside ``patch_client``.)
* Subprocess (the clean way): ``subprocess.run(..., env=hub.subprocess_env(tmp_path / "hf_home", token=...))``
  sets ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE`` (empty cache), ``HF_TOKEN`` and drops inherited hub settings.

Auth: write endpoints (and whoami) need ``Authorization: Bearer <any token>`` (or exactly ``token`` if given),
else 401. Private repos answer 401 + ``X-Error-Code: RepoNotFound`` to anonymous reads. ``hub.requests`` records
method, path, query, endpoint kind, whether a bearer token was sent (never its value) and the status.

Failure injection: ``hub.fail_next("commit", times=1, status=500, after=0, method=None)`` lets ``after`` calls of
that kind through, then fails the next ``times`` ones. Kinds: see ``_ROUTES``. Beware client retries: requests sent
through ``http_backoff`` (preupload, tree listing, the commit of ``upload_folder`` when ``hf_xet`` is installed)
are retried on 408/429/5xx with 1, 2, 4, 8, 8 s sleeps, so use e.g. ``status=403`` to fail them at once.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_NAME = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?")
_R = r"/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_ROUTES = [  # (methods, kind, pattern over the raw, still %-quoted, URL path); the first full match wins
    ("GET", "whoami", r"/api/whoami-v2"),
    ("POST", "create_repo", r"/api/repos/create"),
    ("DELETE", "delete_repo", r"/api/repos/delete"),
    ("POST", "validate_yaml", r"/api/validate-yaml"),
    ("GET", "info", rf"/api/models{_R}(?:/revision/(?P<rev>[^/]+))?"),
    ("GET", "refs", rf"/api/models{_R}/refs"),
    ("GET", "tree", rf"/api/models{_R}/tree/(?P<rev>[^/]+)(?P<rest>/.*)?"),
    ("GET", "commits", rf"/api/models{_R}/commits/(?P<rev>[^/]+)"),
    ("POST", "preupload", rf"/api/models{_R}/preupload/(?P<rev>[^/]+)"),
    ("POST", "commit", rf"/api/models{_R}/commit/(?P<rev>[^/]+)"),
    ("POST DELETE", "branch", rf"/api/models{_R}/branch/(?P<rev>[^/]+)"),
    ("POST", "tag", rf"/api/models{_R}/tag/(?P<rev>[^/]+)"),
    ("GET HEAD", "resolve", rf"{_R}/resolve/(?P<rev>[^/]+)/(?P<rest>.+)"),
]
_ROUTES = [(methods.split(), kind, re.compile(pattern)) for methods, kind, pattern in _ROUTES]
_AUTH_KINDS = frozenset({"whoami", "create_repo", "delete_repo", "preupload", "commit", "branch", "tag"})


class RecordedRequest(NamedTuple):
    method: str
    path: str  # URL path as sent (still %-quoted), without the query string
    query: str
    kind: str  # route kind from _ROUTES, or "unknown"
    authorized: bool  # whether an `Authorization: Bearer ...` header was present (the token is never stored)
    status: int


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **headers: str):
        super().__init__(message)
        self.status, self.body = status, {"error": message}
        self.headers = {"Content-Type": "application/json", "X-Error-Message": message, **headers}
        if code:
            self.headers["X-Error-Code"] = code


@dataclasses.dataclass
class _Commit:
    sha: str
    parent: str | None
    files: dict[str, str]  # path -> git blob sha1
    title: str
    message: str
    date: str


@dataclasses.dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Req:
    method: str
    groups: dict[str, str | None]
    query: dict[str, list[str]]
    body: bytes
    authorized: bool

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise _HttpError(400, f"Invalid JSON body: {e}") from None

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[0].lower() in ("1", "true")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class _Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one request per connection, so shutdown never waits on clients
    server_version = "FakeHub/0.1"

    def do_GET(self) -> None:
        self.server.hub._handle(self)  # type: ignore[attr-defined]

    do_HEAD = do_POST = do_DELETE = do_PUT = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass


class FakeHub:
    """Fake Hub on an ephemeral loopback port; use as a context manager (or ``start()`` / ``stop()``)."""

    def __init__(self, root: str | os.PathLike, *, user: str = "fake-user", token: str | None = None):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.user, self._token = user, token
        self.repos: dict[str, _Repo] = {}
        self.requests: list[RecordedRequest] = []
        self.endpoint = ""
        self._failures: list[list[Any]] = []  # [kind, method, after, times, status]
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle and test helpers
    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)  # type: ignore[union-attr]
            self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, kind: str, times: int = 1, status: int = 500, *, after: int = 0, method: str | None = None):
        """Let `after` requests of `kind` (and `method`, if given) pass, then answer the next `times` with `status`."""
        with self._lock:
            self._failures.append([kind, method, after, times, status])

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Server-side view of a revision: ``{path: content}``."""
        with self._lock:
            commit = self._resolve(self.repos[repo_id], revision)
            return {path: (self.root / "blobs" / oid).read_bytes() for path, oid in commit.files.items()}

    def subprocess_env(self, hf_home: str | os.PathLike, token: str | None = None) -> dict[str, str]:
        """Environment for a child process whose huggingface_hub / transformers must talk to this hub only."""
        drop = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        no_proxy = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get("NO_PROXY")]))
        env.update(HF_ENDPOINT=self.endpoint, HF_HOME=str(hf_home), HF_HUB_CACHE=str(Path(hf_home) / "hub"))
        env.update(HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY=no_proxy, no_proxy=no_proxy)
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    @contextlib.contextmanager
    def patch_client(self, cache_dir: str | os.PathLike | None = None, token: str | None = None) -> Iterator[None]:
        """Point this process's huggingface_hub (and transformers, if imported) defaults at this hub; restore after."""
        from huggingface_hub import constants, hf_api

        template = self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"  # used by hf_hub_url()
        patches = [(constants, "ENDPOINT", self.endpoint), (constants, "HUGGINGFACE_CO_URL_TEMPLATE", template),
                   (hf_api.api, "endpoint", self.endpoint),  # module-level HfApi behind huggingface_hub.<function>
                   (constants, "HF_HUB_OFFLINE", False), (constants, "HF_HUB_DISABLE_TELEMETRY", True)]
        if cache_dir is not None:
            patches.append((constants, "HF_HUB_CACHE", str(cache_dir)))
        if (tf_hub := sys.modules.get("transformers.utils.hub")) is not None:
            patches.append((tf_hub, "_hf_api", None))  # transformers' shared HfApi caches the endpoint
        env = {"HF_ENDPOINT": self.endpoint, **({"HF_TOKEN": token} if token is not None else {})}
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.dict(os.environ, env))
            for obj, name, value in patches:
                stack.enter_context(mock.patch.object(obj, name, value))
            try:
                yield
            finally:  # transformers imported inside the block: drop the HfApi it built for this hub
                if tf_hub is None and (tf_hub := sys.modules.get("transformers.utils.hub")) is not None:
                    tf_hub._hf_api = None

    # ------------------------------------------------------------------ HTTP plumbing
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        kind, groups = "unknown", {}
        for methods, route_kind, pattern in _ROUTES:
            if h.command in methods and (m := pattern.fullmatch(url.path)):
                kind, groups = route_kind, m.groupdict()
                break
        auth = h.headers.get("Authorization", "")
        has_auth = auth.startswith("Bearer ") and len(auth) > len("Bearer ")
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        req = _Req(h.command, groups, parse_qs(url.query), body, has_auth)
        try:
            with self._lock:
                if status := self._injected_failure(kind, h.command):
                    raise _HttpError(status, f"FakeHub: injected failure of {kind!r}")
                if kind == "unknown":
                    raise _HttpError(404, f"FakeHub: no route for {h.command} {url.path}")
                if kind in _AUTH_KINDS and not has_auth:
                    raise _HttpError(401, "FakeHub: this endpoint requires an Authorization bearer token")
                if self._token is not None and has_auth and auth != f"Bearer {self._token}":
                    raise _HttpError(401, "Invalid credentials in Authorization header")
                result = getattr(self, "_h_" + kind)(req)
            if isinstance(result, tuple):
                status, headers, payload = result
            else:
                status, headers, payload = 200, {"Content-Type": "application/json"}, json.dumps(result).encode()
        except _HttpError as e:
            status, headers, payload = e.status, e.headers, json.dumps(e.body).encode()
        except Exception as e:  # a bug in this fake: answer 500 rather than leave the client hanging
            status, headers, payload = 500, {}, json.dumps({"error": f"FakeHub bug: {e!r}"}).encode()
        with self._lock:  # recorded before answering, so a test sees it as soon as the client returns
            self.requests.append(RecordedRequest(h.command, url.path, url.query, kind, has_auth, status))
        h.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            h.send_header(name, value)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    def _injected_failure(self, kind: str, method: str) -> int | None:
        for rule in self._failures:
            if rule[0] == kind and rule[1] in (None, method) and rule[3] > 0:
                if rule[2] > 0:
                    rule[2] -= 1
                    return None
                rule[3] -= 1
                return rule[4]
        return None

    # ------------------------------------------------------------------ storage
    def _put_blob(self, data: bytes) -> str:
        oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id, as the Hub reports
        path = self.root / "blobs" / oid
        if not path.exists():
            path.with_suffix(".tmp").write_bytes(data)
            path.with_suffix(".tmp").replace(path)
        return oid

    def _size(self, oid: str) -> int:
        return (self.root / "blobs" / oid).stat().st_size

    def _new_commit(self, repo: _Repo, parent: str | None, files: dict[str, str], title: str, message: str = "") -> str:
        seed = json.dumps([repo.repo_id, parent, next(self._counter), sorted(files.items()), title, time.time()])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = _Commit(sha, parent, dict(files), title, message, _now())
        return sha

    def _persist(self) -> None:
        state = {rid: dataclasses.asdict(repo) for rid, repo in self.repos.items()}
        (self.root / "repos.json").write_text(json.dumps(state, indent=1))

    def _repo(self, req: _Req) -> _Repo:
        ns, name = unquote(req.groups["ns"] or ""), unquote(req.groups["name"] or "")
        repo = self.repos.get(f"{ns}/{name}") if _valid_repo_id(ns, name) else None
        if repo is None or (repo.private and not req.authorized):
            raise _HttpError(401 if not req.authorized else 404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        sha = repo.branches.get(revision) or repo.tags.get(revision) or revision
        if sha not in repo.commits:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def _commit_of(self, req: _Req) -> tuple[_Repo, _Commit]:
        repo = self._repo(req)
        return repo, self._resolve(repo, unquote(req.groups.get("rev") or "main"))

    def _file_entry(self, path: str, oid: str) -> dict[str, Any]:
        return {"type": "file", "path": path, "oid": oid, "size": self._size(oid)}

    @staticmethod
    def _dir_entry(commit: _Commit, path: str) -> dict[str, Any]:
        return {"type": "directory", "path": path, "oid": hashlib.sha1(f"{commit.sha}:{path}".encode()).hexdigest()}

    # ------------------------------------------------------------------ endpoints (called with the lock held)
    def _h_whoami(self, req: _Req) -> dict[str, Any]:
        auth = {"type": "access_token", "accessToken": {"displayName": "fake-token", "role": "write"}}
        return {"type": "user", "id": "0" * 24, "name": self.user, "fullname": "Fake User", "orgs": [], "auth": auth}

    def _h_create_repo(self, req: _Req) -> dict[str, Any]:
        data = req.json()
        if data.get("type") not in (None, "model"):
            raise _HttpError(400, "FakeHub only hosts model repos")
        ns, name = data.get("organization") or self.user, str(data.get("name") or "")
        repo_id = f"{ns}/{name}"
        if not _valid_repo_id(ns, name):
            raise _HttpError(400, f"Invalid repo id: {repo_id!r}")
        if repo_id in self.repos:  # the client reads "url" from this 409 body when create_repo(exist_ok=True)
            err = _HttpError(409, "You already created this model repo")
            err.body["url"] = f"{self.endpoint}/{repo_id}"
            raise err
        private = data["visibility"] == "private" if "visibility" in data else bool(data.get("private"))
        repo = self.repos[repo_id] = _Repo(repo_id, private, _now())
        repo.branches["main"] = self._new_commit(repo, None, {".gitattributes": self._put_blob(GITATTRIBUTES)},
                                                 "initial commit")
        self._persist()
        return {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}

    def _h_delete_repo(self, req: _Req) -> dict[str, Any]:
        data = req.json()
        if self.repos.pop(f"{data.get('organization') or self.user}/{data.get('name')}", None) is None:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        self._persist()
        return {}

    def _h_validate_yaml(self, req: _Req) -> dict[str, Any]:
        return {"errors": [], "warnings": []}

    def _h_info(self, req: _Req) -> dict[str, Any]:
        repo, commit = self._commit_of(req)
        siblings = [{"rfilename": p, "size": self._size(oid), "blobId": oid} for p, oid in sorted(commit.files.items())]
        return {"_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": commit.sha, "private": repo.private, "gated": False, "disabled": False, "downloads": 0,
                "likes": 0, "tags": [], "createdAt": repo.created_at, "lastModified": commit.date,
                "siblings": siblings}

    def _h_refs(self, req: _Req) -> dict[str, Any]:
        repo = self._repo(req)

        def refs(kind: str, table: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(table.items())]

        return {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags), "converts": [],
                "pullRequests": []}

    def _h_tree(self, req: _Req) -> list[dict[str, Any]]:
        _, commit = self._commit_of(req)
        base = unquote(req.groups["rest"] or "").strip("/")
        prefix, recursive, entries = base + "/" if base else "", req.flag("recursive"), {}
        for path, oid in commit.files.items():
            if path.startswith(prefix):
                parts = path[len(prefix) :].split("/")
                for i in range(1, len(parts) if recursive else min(2, len(parts))):
                    entries[prefix + "/".join(parts[:i])] = self._dir_entry(commit, prefix + "/".join(parts[:i]))
                if recursive or len(parts) == 1:
                    entries[path] = self._file_entry(path, oid)
        if base and not entries:
            raise _HttpError(404, f"Entry not found: {base}", "EntryNotFound")
        return [entries[p] for p in sorted(entries)]

    def _h_commits(self, req: _Req) -> list[dict[str, Any]]:
        repo, commit = self._commit_of(req)
        out = []
        while commit is not None:
            out.append({"id": commit.sha, "title": commit.title, "message": commit.message, "date": commit.date,
                        "authors": [{"user": self.user}]})
            commit = repo.commits.get(commit.parent)  # type: ignore[arg-type]
        return out

    def _h_preupload(self, req: _Req) -> dict[str, Any]:
        _, commit = self._commit_of(req)  # everything is "regular": no LFS / Xet upload path is ever needed
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": commit.files.get(f["path"])}
                 for f in req.json().get("files", [])]
        return {"files": files, "commitOid": commit.sha}

    def _h_commit(self, req: _Req) -> dict[str, Any]:
        repo, branch = self._repo(req), unquote(req.groups["rev"] or "")
        if req.flag("create_pr"):
            raise _HttpError(400, "FakeHub does not support pull requests")
        if branch not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {branch} (commits go to branches)", "RevisionNotFound")
        head, header = repo.commits[repo.branches[branch]], {}
        files = dict(head.files)
        for line in filter(None, (raw.strip() for raw in req.body.splitlines())):
            item = json.loads(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file" and value.get("encoding", "base64") == "base64":
                files[value["path"]] = self._put_blob(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(value["path"].rstrip("/") + "/")]
                if not doomed:
                    raise _HttpError(404, "A folder with this name doesn't exist", "EntryNotFound")
                for path in doomed:
                    del files[path]
            else:
                raise _HttpError(400, f"FakeHub only supports regular base64 files, got {key!r}")
        if header.get("parentCommit") not in (None, head.sha):
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
        sha = self._new_commit(repo, head.sha, files, header.get("summary", ""), header.get("description", ""))
        repo.branches[branch] = sha
        self._persist()
        return {"success": True, "commitOid": sha, "commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{sha}",
                "pullRequestUrl": None}

    def _h_branch(self, req: _Req) -> dict[str, Any]:
        repo, name = self._repo(req), unquote(req.groups["rev"] or "")
        if req.method == "DELETE":
            if name == "main" or repo.branches.pop(name, None) is None:
                raise _HttpError(404 if name != "main" else 403, f"Cannot delete branch {name}", "RevisionNotFound")
        elif name in repo.branches:
            raise _HttpError(409, f"Reference already exists: refs/heads/{name}")
        else:
            repo.branches[name] = self._resolve(repo, req.json().get("startingPoint") or "main").sha
        self._persist()
        return {}

    def _h_tag(self, req: _Req) -> dict[str, Any]:
        repo, commit = self._commit_of(req)
        tag = str(req.json().get("tag") or "")
        if not tag or tag in repo.tags:
            raise _HttpError(409 if tag else 400, f"Cannot create tag {tag!r}")
        repo.tags[tag] = commit.sha
        self._persist()
        return {}

    def _h_resolve(self, req: _Req) -> tuple[int, dict[str, str], bytes]:
        _, commit = self._commit_of(req)
        oid = commit.files.get(unquote(req.groups["rest"] or ""))
        if oid is None:
            raise _HttpError(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": commit.sha})
        headers = {"ETag": f'"{oid}"', "X-Repo-Commit": commit.sha, "Content-Type": "application/octet-stream"}
        return 200, headers, (self.root / "blobs" / oid).read_bytes()


def _valid_repo_id(namespace: str, name: str) -> bool:
    return all(_NAME.fullmatch(s) and "--" not in s and ".." not in s for s in (namespace, name))


@pytest.fixture
def fake_hub(tmp_path: Path) -> Iterator[FakeHub]:
    """A started :class:`FakeHub` storing its data under ``tmp_path / "fake_hub"``."""
    with FakeHub(tmp_path / "fake_hub") as hub:
        yield hub
