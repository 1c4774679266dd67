"""Tests of the fake Hub test fixture (tests/hub_server.py) against the real huggingface_hub / transformers clients."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._runtime import is_xet_available

try:
    from tests import hub_server
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import hub_server

FakeHub = hub_server.FakeHub
fake_hub = hub_server.fake_hub  # the exported fixture

TOKEN = "hf_test"
REPO = "fake-user/tiny"
LOCAL_FILES = {"config.json": b'{"a": 1}\n', "weights.bin": bytes(range(256)) * 4, "sub/dir/notes.txt": b"notes\n"}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # an inherited HF_HUB_OFFLINE=1 blocks loopback too
    with FakeHub(tmp_path / "hub", token=TOKEN) as hub:
        yield hub


@pytest.fixture
def api(hub: FakeHub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _raw(hub: FakeHub, method: str, path: str, body: bytes | None = None, token: str | None = None):
    """Plain urllib request (no proxies), returns (status, headers, body)."""
    request = urllib.request.Request(hub.endpoint + path, data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _commit_posts(hub: FakeHub) -> list[int]:
    return [r.status for r in hub.requests if r.kind == "commit"]


def test_server_is_loopback_and_stops_cleanly(tmp_path: Path):
    with FakeHub(tmp_path / "hub") as hub:
        assert hub.endpoint.startswith("http://127.0.0.1:")
        status, _, body = _raw(hub, "GET", "/api/whoami-v2", token="anything")
        assert (status, json.loads(body)["name"]) == (200, "fake-user")
    with pytest.raises(urllib.error.URLError):
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(hub.endpoint + "/api/whoami-v2", timeout=2)


def test_exported_fixture(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = HfApi(endpoint=fake_hub.endpoint, token="any-token")
    assert api.create_repo("fake-user/x").repo_id == "fake-user/x"
    assert fake_hub.files("fake-user/x") == {".gitattributes": hub_server.GITATTRIBUTES}
    assert [(r.kind, r.authorized) for r in fake_hub.requests] == [("create_repo", True)]


def test_whoami_and_write_endpoints_require_a_token(hub: FakeHub, api: HfApi, tmp_path: Path):
    assert api.whoami()["name"] == "fake-user"
    assert _raw(hub, "GET", "/api/whoami-v2")[0] == 401
    assert _raw(hub, "GET", "/api/whoami-v2", token="hf_wrong")[0] == 401

    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.create_repo(REPO)
    assert err.value.response.status_code == 401
    assert REPO not in hub.repos

    api.create_repo(REPO)
    folder = _write_folder(tmp_path / "folder", LOCAL_FILES)
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.upload_folder(repo_id=REPO, folder_path=folder)
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.create_branch(REPO, branch="dev")
    assert err.value.response.status_code == 401
    assert set(hub.files(REPO)) == {".gitattributes"}
    assert [(r.kind, r.authorized, r.status) for r in hub.requests if r.status == 401] == [
        ("whoami", False, 401),
        ("whoami", True, 401),
        ("create_repo", False, 401),
        ("preupload", False, 401),
        ("branch", False, 401),
    ]
    assert TOKEN not in repr(hub.requests) and "hf_wrong" not in repr(hub.requests)


def test_private_repo_upload_list_and_info(hub: FakeHub, api: HfApi, tmp_path: Path):
    url = api.create_repo(REPO, private=True)
    assert (url.repo_id, url.endpoint) == (REPO, hub.endpoint)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    api.create_repo("fake-user/public", private=False)

    folder = _write_folder(tmp_path / "folder", LOCAL_FILES)
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add files")
    assert len(info.oid) == 40

    expected = sorted([".gitattributes", *LOCAL_FILES])
    assert api.list_repo_files(REPO) == expected
    assert {p: b for p, b in hub.files(REPO).items() if p != ".gitattributes"} == LOCAL_FILES
    model = api.model_info(REPO, files_metadata=True)
    assert (model.id, model.sha, model.private) == (REPO, info.oid, True)
    assert {s.rfilename: s.size for s in model.siblings} == {
        ".gitattributes": len(hub.files(REPO)[".gitattributes"]),
        **{p: len(b) for p, b in LOCAL_FILES.items()},
    }
    assert api.model_info("fake-user/public").private is False
    tree = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert tree == {".gitattributes": "RepoFile", "config.json": "RepoFile", "sub": "RepoFolder",
                    "weights.bin": "RepoFile"}
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="sub", recursive=True)] == [
        "sub/dir", "sub/dir/notes.txt"]
    assert [c.title for c in api.list_repo_commits(REPO)] == ["add files", "initial commit"]

    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("fake-user/missing")
    status, headers, _ = _raw(hub, "HEAD", f"/{REPO}/resolve/main/config.json")
    assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
    status, headers, _ = _raw(hub, "POST", "/api/repos/create", b'{"name": "bad--name"}', token=TOKEN)
    assert status == 400


def test_uploading_the_same_folder_twice_creates_no_new_commit(hub: FakeHub, api: HfApi, tmp_path: Path):
    api.create_repo(REPO, private=True)
    folder = _write_folder(tmp_path / "folder", LOCAL_FILES)
    first = api.upload_folder(repo_id=REPO, folder_path=folder)
    files_after_first = api.list_repo_files(REPO)
    second = api.upload_folder(repo_id=REPO, folder_path=folder)
    assert second.oid == first.oid
    assert api.list_repo_files(REPO) == files_after_first == sorted([".gitattributes", *LOCAL_FILES])
    assert _commit_posts(hub) == [200]
    assert len(api.list_repo_commits(REPO)) == 2
    assert {p: b for p, b in hub.files(REPO).items() if p != ".gitattributes"} == LOCAL_FILES

    (folder / "config.json").write_bytes(b'{"a": 2}\n')
    third = api.upload_folder(repo_id=REPO, folder_path=folder)
    assert third.oid not in (first.oid, second.oid)
    assert hub.files(REPO)["config.json"] == b'{"a": 2}\n'
    assert hub.files(REPO, revision=first.oid)["config.json"] == b'{"a": 1}\n'
    assert _commit_posts(hub) == [200, 200]


def test_branches_and_revisions(hub: FakeHub, api: HfApi, tmp_path: Path):
    api.create_repo(REPO, private=True)
    main_sha = api.upload_folder(repo_id=REPO, folder_path=_write_folder(tmp_path / "f1", LOCAL_FILES)).oid
    api.create_branch(REPO, branch="dev")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(REPO, branch="dev")
    assert err.value.response.status_code == 409
    api.create_branch(REPO, branch="dev", exist_ok=True)
    assert api.model_info(REPO, revision="dev").sha == main_sha

    dev_sha = api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=REPO, revision="dev").oid
    assert dev_sha != main_sha
    assert api.list_repo_files(REPO, revision="dev") == sorted([".gitattributes", "dev.txt", *LOCAL_FILES])
    assert "dev.txt" not in api.list_repo_files(REPO)
    assert api.model_info(REPO).sha == main_sha
    assert api.model_info(REPO, revision="dev").sha == dev_sha
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main_sha, "dev": dev_sha}

    api.create_tag(REPO, tag="v1", revision="dev")
    assert api.list_repo_files(REPO, revision="v1") == api.list_repo_files(REPO, revision=dev_sha)
    path = hf_hub_download(REPO, "dev.txt", revision="v1", cache_dir=tmp_path / "cache", token=TOKEN,
                           endpoint=hub.endpoint)
    assert Path(path).read_bytes() == b"dev only"
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "dev.txt", revision="nope", cache_dir=tmp_path / "c2", token=TOKEN,
                        endpoint=hub.endpoint)
    api.delete_branch(REPO, branch="dev")
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main"]


def test_delete_file_and_folder(hub: FakeHub, api: HfApi, tmp_path: Path):
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=_write_folder(tmp_path / "folder", LOCAL_FILES))
    api.delete_file("weights.bin", repo_id=REPO)
    assert api.list_repo_files(REPO) == [".gitattributes", "config.json", "sub/dir/notes.txt"]
    api.delete_folder("sub", repo_id=REPO)
    assert api.list_repo_files(REPO) == [".gitattributes", "config.json"]
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("weights.bin", repo_id=REPO)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "weights.bin", cache_dir=tmp_path / "cache", endpoint=hub.endpoint)
    assert len(api.list_repo_commits(REPO)) == 4


def test_hf_hub_download_and_snapshot_download(hub: FakeHub, api: HfApi, tmp_path: Path):
    api.create_repo(REPO, private=True)
    sha = api.upload_folder(repo_id=REPO, folder_path=_write_folder(tmp_path / "folder", LOCAL_FILES)).oid
    hub.requests.clear()

    cache = tmp_path / "cache"
    path = Path(hf_hub_download(REPO, "sub/dir/notes.txt", cache_dir=cache, token=TOKEN, endpoint=hub.endpoint))
    assert path.read_bytes() == LOCAL_FILES["sub/dir/notes.txt"]
    assert path.is_relative_to(cache / "models--fake-user--tiny" / "snapshots" / sha)
    assert (cache / "models--fake-user--tiny" / "refs" / "main").read_text() == sha
    assert [(r.method, r.kind, r.authorized, r.status) for r in hub.requests] == [
        ("HEAD", "resolve", True, 200),
        ("GET", "resolve", True, 200),
    ]
    status, headers, body = _raw(hub, "GET", f"/{REPO}/resolve/main/weights.bin", token=TOKEN)
    assert (status, body, headers["X-Repo-Commit"], int(headers["Content-Length"])) == (
        200, LOCAL_FILES["weights.bin"], sha, len(LOCAL_FILES["weights.bin"]))
    assert headers["ETag"].strip('"') == api.model_info(REPO, files_metadata=True).siblings[-1].blob_id

    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path / "cache2", token=TOKEN, endpoint=hub.endpoint))
    got = {str(p.relative_to(snapshot)): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert got == hub.files(REPO)
    assert {p: b for p, b in got.items() if p != ".gitattributes"} == LOCAL_FILES


def test_fail_next_simulates_a_broken_commit(hub: FakeHub, api: HfApi, tmp_path: Path):
    from huggingface_hub import CommitOperationAdd

    api.create_repo(REPO)
    head = api.model_info(REPO).sha
    hub.fail_next("commit", status=500, after=1)
    ok = api.create_commit(REPO, [CommitOperationAdd("one.txt", b"1")], commit_message="one")
    with pytest.raises(HfHubHTTPError) as err:  # create_commit does not retry its commit POST
        api.create_commit(REPO, [CommitOperationAdd("two.txt", b"2")], commit_message="two")
    assert err.value.response.status_code == 500
    assert api.model_info(REPO).sha == ok.oid != head
    assert api.list_repo_files(REPO) == [".gitattributes", "one.txt"]

    # A 403 fails upload_folder at once, whichever code path the client takes.
    folder = _write_folder(tmp_path / "folder", LOCAL_FILES)
    hub.fail_next("commit", status=403)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(repo_id=REPO, folder_path=folder)
    assert err.value.response.status_code == 403
    assert api.list_repo_files(REPO) == [".gitattributes", "one.txt"]
    api.upload_folder(repo_id=REPO, folder_path=folder)  # re-running resumes the broken upload
    assert {p: b for p, b in hub.files(REPO).items() if p in LOCAL_FILES} == LOCAL_FILES
    assert _commit_posts(hub) == [200, 500, 403, 200]

    hub.fail_next("commit", status=500)
    (folder / "config.json").write_bytes(b"changed")
    if is_xet_available():  # pipelined upload_folder retries its commit POST on 5xx (after a 1 s sleep)
        api.upload_folder(repo_id=REPO, folder_path=folder)
        assert hub.files(REPO)["config.json"] == b"changed"
        assert _commit_posts(hub) == [200, 500, 403, 200, 500, 200]
    else:  # HF_HUB_DISABLE_XET=1 or no hf_xet: upload_folder is a single create_commit, no retry
        with pytest.raises(HfHubHTTPError):
            api.upload_folder(repo_id=REPO, folder_path=folder)
        assert _commit_posts(hub) == [200, 500, 403, 200, 500]


def test_patch_client_points_module_defaults_at_the_hub_and_restores_them(hub: FakeHub, api: HfApi, tmp_path: Path):
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    endpoint_before = constants.ENDPOINT
    with hub.patch_client(cache_dir=tmp_path / "cache"):
        path = hf_hub_download(REPO, "x.txt")  # no endpoint / cache_dir / token arguments
        assert Path(path).read_bytes() == b"x"
        assert Path(path).is_relative_to(tmp_path / "cache")
        assert HfApi().list_repo_files(REPO) == [".gitattributes", "x.txt"]
    assert constants.ENDPOINT == endpoint_before != hub.endpoint


def _tiny_llama(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    input_ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        return input_ids, model(input_ids).logits


_LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)  # as the test process (conftest): the same kernels, bit-identical logits
    repo_id, cache_dir, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(repo_id, cache_dir=cache_dir).eval()
    with torch.no_grad():
        torch.save(model(torch.load(ids_path)).logits, out_path)
""")


def test_transformers_roundtrip_through_the_fake_hub(hub: FakeHub, api: HfApi, tmp_path: Path):
    input_ids, logits = _tiny_llama(tmp_path / "model")
    api.create_repo(REPO, private=True)
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "model")
    assert {"config.json", "model.safetensors"} <= set(api.list_repo_files(REPO))
    hub.requests.clear()

    # Clean path: a subprocess with HF_ENDPOINT / HF_HOME / HF_HUB_CACHE / HF_TOKEN in its environment.
    torch.save(input_ids, tmp_path / "ids.pt")
    cache = tmp_path / "sub_cache"
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, REPO, str(cache), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        env=hub.subprocess_env(tmp_path / "hf_home", token=TOKEN), cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits)
    assert (cache / "models--fake-user--tiny").is_dir()
    downloads = {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.kind == "resolve" and r.method == "GET"}
    assert {"config.json", "model.safetensors"} <= downloads
    assert all(r.authorized for r in hub.requests)

    # In-process: the same through patch_client.
    from transformers import AutoModelForCausalLM

    with hub.patch_client(token=TOKEN):
        model = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=tmp_path / "inproc_cache").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, logits)
    assert (tmp_path / "inproc_cache" / "models--fake-user--tiny").is_dir()
