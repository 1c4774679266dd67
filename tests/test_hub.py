"""Sharing on the Hub: remote code that loads where `modeling_ebt` is not installed; what `ebt push` stages, on disk;
what it asks of huggingface_hub, with `HfApi`'s public methods replaced by recorders; checks before any upload; and
one real round trip, `ebt push` then `from_pretrained(..., trust_remote_code=True)` in clean processes, through the
stock client against a Hub on loopback (tests/hub_server.py)."""

import hashlib
import inspect
import json
import os
import shutil
import struct
import subprocess
import sys
import traceback
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl, constants
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from modeling_ebt import EBTForCausalLM, EBTTokenizer
from modeling_ebt.cli import main
from modeling_ebt.hub import PushError, push, stage
from modeling_ebt.hub.publish import TEMPLATE, without_local_paths

from .conftest import REFERENCE_FIXTURES, require_shared, tiny_model
from .hub_server import LoopbackHub

TOKEN = "hf_FakeSecretToken4f1e9c0b7a2d"  # recognisable, so that a leak is found by grepping for it
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
        "of outrageous fortune")
REPO = "alice/tiny-ebt"


def ebt_outputs(model, tokenizer):
    """What must not depend on how the model was loaded: logits and energies of the descent, greedy generation
    (with the model's thinking defaults and with thinking knobs), and which classes ran."""
    import torch

    ids = tokenizer(["To be, or not to be"], return_tensors="pt").input_ids
    forward = model(input_ids=ids)
    greedy = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    generated = model.generate(ids, return_dict_in_generate=True, **greedy)
    thinking = model.generate(ids, mcmc_num_steps=4, num_candidates=2, **greedy)
    return {"logits": forward.logits.detach(), "energies": forward.energies.detach(), "tokens": generated.sequences,
            "token_energies": generated.energies, "thinking_tokens": thinking,
            "text": tokenizer.decode(generated.sequences[0]),
            "classes": [type(x).__module__ + "." + type(x).__name__ for x in (model.config, model, tokenizer)],
            "default_steps": getattr(model.generation_config, "mcmc_num_steps", None)}


REMOTE_SCRIPT = '''
import importlib.abc
import sys


class BlockModelingEbt(importlib.abc.MetaPathFinder):  # the editable install's finder must not find it either
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_ebt" or name.startswith("modeling_ebt."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)


sys.meta_path.insert(0, BlockModelingEbt())
try:
    import modeling_ebt  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    sys.exit("modeling_ebt is importable: this is no clean environment")

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

{ebt_outputs}

source, revision, threads, out = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(source, revision=revision, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=True)
result = ebt_outputs(model, tokenizer)
if sys.argv[5:] == ["--base-model"]:
    result["base_model"] = type(AutoModel.from_pretrained(source, revision=revision, trust_remote_code=True)).__name__
result["modeling_ebt_loaded"] = any(name.split(".")[0] == "modeling_ebt" for name in sys.modules)
torch.save(result, out)
'''


def load_remotely(source, tmp_path, env, revision=None, base_model=False) -> dict:
    """`ebt_outputs` of `source` loaded with trust_remote_code in a fresh interpreter where modeling_ebt is blocked."""
    script, out = tmp_path / "load_remote.py", tmp_path / "remote_outputs.pt"
    script.write_text(REMOTE_SCRIPT.replace("{ebt_outputs}", inspect.getsource(ebt_outputs)))
    command = [sys.executable, "-I", str(script), str(source), revision or "", str(torch.get_num_threads()), str(out)]
    run = subprocess.run(command + (["--base-model"] if base_model else []), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out, weights_only=False)


def assert_same_outputs(remote: dict, local: dict) -> None:
    for key in ("logits", "energies", "tokens", "token_energies", "thinking_tokens"):
        assert torch.equal(remote[key], local[key]), key
    assert remote["text"] == local["text"]
    assert all(name.startswith("transformers_modules.") for name in remote["classes"]), remote["classes"]
    assert not remote["modeling_ebt_loaded"]


def clean_env(hf_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "PYTHON", "TRANSFORMERS"))}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")



@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """A tiny EBT after three optimizer steps on a line of Hamlet, saved with its tokenizer (and so its code)."""
    tokenizer = EBTTokenizer()
    model = tiny_model(denoising_initial_condition="zeros").train()
    ids = torch.tensor([tokenizer(TEXT).input_ids[:48]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("trained") / "model"
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def expected(trained_dir) -> dict:
    """The outputs with the installed package (loaded without trust_remote_code)."""
    return ebt_outputs(EBTForCausalLM.from_pretrained(trained_dir).eval(), AutoTokenizer.from_pretrained(trained_dir))


@pytest.fixture
def run_dir(trained_dir, tmp_path) -> Path:
    """The trained model with the records `ebt train` and `ebt eval` leave beside it, with known figures."""
    folder = tmp_path / "run"
    folder.mkdir()
    for path in trained_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    summary = {"model_size": "xxs", "recipe": "cpu-small", "corpus": "karpathy/tiny_shakespeare",
               "tokenizer": "EBTTokenizer (bytes)", "num_parameters": 31041, "config": {"mcmc_num_steps": 2,
               "mcmc_step_size": 5.0}, "block_size": 64, "global_batch_size": 8, "num_processes": 1,
               "learning_rate": 0.0012, "steps": 3, "planned_steps": 3, "tokens_seen": 123456, "alpha": 4.98765,
               "final_train_loss": 2.4683, "eval": {"eval_last_step_loss": 2.7182, "eval_perplexity": 15.15},
               "train_seconds_this_session": 1.5, "seed": 0}
    results = {"model_dir": str(folder), "corpus": "karpathy/tiny_shakespeare", "block_size": 64,
               "num_sequences": 16, "num_tokens": 1008, "trained_steps": 2, "seed": 0,
               "loss": "cross-entropy (nats/token) of the last descent step's prediction",
               "by_steps": {"1": {"loss": 3.1416, "perplexity": 23.14}, "2": {"loss": 2.9979, "perplexity": 20.04},
                            "4": {"loss": 2.8854, "perplexity": 17.91}},
               "by_candidates": {"1": {"loss": 2.9979, "perplexity": 20.04},
                                 "2": {"loss": 2.9702, "perplexity": 19.5}}}
    (folder / "training_summary.json").write_text(json.dumps(summary))
    (folder / "eval_results.json").write_text(json.dumps(results))
    (folder / "eval_plot.png").write_bytes(tiny_png())
    return folder


# --- remote code --------------------------------------------------------------------------------------------------


def test_saved_model_carries_self_contained_remote_code_and_auto_map(trained_dir):
    config = json.loads((trained_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_ebt.EBTConfig",
                                  "AutoModelForCausalLM": "modeling_ebt.EBTForCausalLM"}
    tokenizer_config = json.loads((trained_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_ebt.EBTTokenizer"
    # these three files are all that travels: none may import another module of the package (such as constants)
    relative = {"modeling_ebt.py": ["configuration_ebt"], "configuration_ebt.py": [],
                "tokenization_ebt.py": ["configuration_ebt"]}  # (a function-level import, for register_tokenizer)
    assert {path.name for path in trained_dir.glob("*.py")} == set(relative)
    for name, allowed in relative.items():
        assert get_relative_imports(trained_dir / name) == allowed, name
        # what transformers requires to be installed for the remote code (the standard library aside)
        third_party = {m for m in get_imports(trained_dir / name) if m not in sys.stdlib_module_names}
        assert third_party <= {"torch", "transformers"}, (name, third_party)
    code = (trained_dir / "modeling_ebt.py").read_text()
    assert "def generate(" in code and "num_candidates" in code  # the cached, thinking generate travels with it


def test_saved_model_loads_locally_without_trust_remote_code(trained_dir):
    assert type(AutoConfig.from_pretrained(trained_dir)).__module__ == "modeling_ebt.configuration_ebt"
    assert type(AutoModelForCausalLM.from_pretrained(trained_dir)) is EBTForCausalLM
    assert type(AutoTokenizer.from_pretrained(trained_dir)) is EBTTokenizer


def test_saved_model_loads_as_remote_code_where_modeling_ebt_is_not_importable(trained_dir, expected, tmp_path):
    remote = load_remotely(trained_dir, tmp_path, clean_env(tmp_path / "hf_home"))
    assert_same_outputs(remote, expected)


# --- what `ebt push` stages, on disk --------------------------------------------------------------------------------


def staged_files(model_dir: Path, out: Path, **options) -> dict[str, bytes]:
    stage(model_dir, out, REPO, **options)
    return {path.name: path.read_bytes() for path in out.iterdir()}


def test_staged_folder_loads_with_the_package_and_leaves_the_model_untouched(trained_dir, expected, tmp_path):
    before = digest(trained_dir)
    files = staged_files(trained_dir, tmp_path / "staged")
    assert {"model.safetensors", "config.json", "generation_config.json", "modeling_ebt.py", "configuration_ebt.py",
            "tokenization_ebt.py", "tokenizer_config.json", "README.md"} <= set(files)
    assert json.loads(files["generation_config.json"])["mcmc_num_steps"] == 2
    assert json.loads(files["config.json"])["auto_map"]["AutoModel"] == "modeling_ebt.EBTModel"
    installed = AutoModelForCausalLM.from_pretrained(tmp_path / "staged").eval()  # with the package: no remote code
    assert type(installed) is EBTForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "staged")
    assert torch.equal(ebt_outputs(installed, tokenizer)["tokens"], expected["tokens"])
    assert digest(trained_dir) == before


def test_staging_is_reproducible_and_the_records_change_only_the_card(trained_dir, run_dir, tmp_path):
    first = staged_files(trained_dir, tmp_path / "first")
    assert staged_files(trained_dir, tmp_path / "again") == first  # an unchanged push has nothing new to commit
    last = staged_files(run_dir, tmp_path / "last")
    assert set(last) == set(first) | {"training_summary.json", "eval_results.json", "eval_plot.png"}
    assert last["model.safetensors"] == first["model.safetensors"] and last["README.md"] != first["README.md"]
    # the records go up without this machine's folders: a local corpus by its file name, as on the card
    assert json.loads(last["eval_results.json"])["model_dir"] == "run"
    assert str(tmp_path) not in last["training_summary.json"].decode() + last["eval_results.json"].decode()
    local = {"corpus": str(tmp_path / "data" / "hamlet.txt"), "tokenizer": "gpt2", "steps": 3, "model_dir": "a/b"}
    assert without_local_paths(local) == {"corpus": "hamlet.txt", "tokenizer": "gpt2", "steps": 3, "model_dir": "b"}


def test_model_card_holds_the_run_and_parses_back(run_dir, tmp_path):
    assert TEMPLATE.is_file()  # found through the installed package
    files = staged_files(run_dir, tmp_path / "staged")
    assert files["eval_plot.png"] == (run_dir / "eval_plot.png").read_bytes()
    local = json.loads((run_dir / "eval_results.json").read_text())
    assert json.loads(files["eval_results.json"]) == {**local, "model_dir": "run"}  # no local folders
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["ebt", "energy-based-model"] and card.data.license == "apache-2.0"
    assert card.data.datasets == ["karpathy/tiny_shakespeare"]
    metrics = {(r.metric_name, r.metric_value) for r in card.data.eval_results}
    assert ("validation loss, descent_steps=4", 2.8854) in metrics
    assert ("validation loss, num_candidates=2", 2.9702) in metrics
    for figure in ("123,456", "2.4683", "2.7182", "4.98765", "3.1416", "2.9979", "2.8854", "2.9702", "19.50",
                   "karpathy/tiny_shakespeare", "](eval_plot.png)", "cpu-small"):
        assert figure in card.text, figure
    assert "{{" not in card.content and "None" not in card.text


# --- what `ebt push` asks of huggingface_hub ------------------------------------------------------------------------


class RecordedHub:
    """The public `HfApi` methods that `push` calls, replaced: each call is recorded as (name, kwargs), and the files
    of each uploaded folder are kept (push deletes its temporary folder once the upload returns)."""

    def __init__(self, monkeypatch):
        self.calls, self.uploads, self.public_repos, self.error = [], [], set(), None
        for name in ("create_repo", "model_info", "create_branch", "upload_folder"):
            monkeypatch.setattr(HfApi, name, self._recorder(name))
        monkeypatch.setenv("HF_TOKEN", TOKEN)

    def _recorder(self, name):
        def method(api, repo_id=None, **kwargs):
            self.calls.append((name, {"repo_id": repo_id, **kwargs}))
            return getattr(self, name)(**self.calls[-1][1])
        return method

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def model_info(self, repo_id, **kwargs):
        return SimpleNamespace(id=repo_id, private=repo_id not in self.public_repos)

    def create_branch(self, repo_id, **kwargs):
        return None

    def upload_folder(self, repo_id, folder_path, **kwargs):
        if self.error is not None:
            raise self.error
        self.uploads.append({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}")


@pytest.fixture
def hub(monkeypatch) -> RecordedHub:
    return RecordedHub(monkeypatch)


def test_push_uploads_the_staged_folder_in_one_commit(trained_dir, hub, tmp_path, capsys):
    assert main(["push", str(trained_dir), REPO]) == 0
    assert capsys.readouterr().out.strip().endswith(f"published https://huggingface.co/{REPO}/commit/{'0' * 40}")
    assert hub.calls[0] == ("create_repo", {"repo_id": REPO, "repo_type": "model", "private": None, "exist_ok": True})
    upload = hub.calls[1][1]
    assert hub.names() == ["create_repo", "upload_folder"] and upload["revision"] is None
    assert hub.uploads == [staged_files(trained_dir, tmp_path / "staged")]
    # weights of an earlier (sharded) push are deleted in the same commit, the owner's other files stay: the listing
    # below is a repo's, filtered by the client with the patterns push passed
    listing = [".gitattributes", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "NOTES.txt",
               "onnx/model.safetensors", "pytorch_model.bin", "pytorch_model-00002-of-00002.bin", "docs/README.md"]
    deleted = set(filter_repo_objects(listing, allow_patterns=upload["delete_patterns"]))
    assert deleted == {"model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model-00002-of-00002.bin"}


def test_revision_and_private_pass_through(trained_dir, hub, capsys):
    assert main(["push", str(trained_dir), REPO, "--private", "--revision", "v1"]) == 0
    assert hub.names() == ["create_repo", "model_info", "create_branch", "upload_folder"]
    assert hub.calls[0][1]["private"] is True
    assert hub.calls[2] == ("create_branch", {"repo_id": REPO, "branch": "v1", "exist_ok": True})
    assert hub.calls[3][1]["revision"] == "v1"  # the one upload goes to the branch: main is not touched
    assert 'revision="v1"' in hub.uploads[-1]["README.md"].decode()
    hub.public_repos.add("alice/public-ebt")
    hub.calls.clear()
    assert main(["push", str(trained_dir), "alice/public-ebt", "--private"]) == 0
    # an existing repo keeps its visibility (no call changes it), with a note
    assert hub.names() == ["create_repo", "model_info", "upload_folder"]
    assert "already exists and is public" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("no_weights", "holds no weights"),
    ("other_model_type", "type 'llama', not an EBT"),
    ("bad_repo_id", "invalid repo id"),
    ("missing_folder", "does not exist"),
    ("no_config", "holds no config.json"),
])
def test_bad_input_fails_clearly_before_any_request(case, message, trained_dir, hub, tmp_path, capsys):
    folder, repo_id = tmp_path / "model", REPO
    folder.mkdir()
    config = json.loads((trained_dir / "config.json").read_text())
    if case == "no_weights":
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "other_model_type":
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
        (folder / "model.safetensors").write_bytes((trained_dir / "model.safetensors").read_bytes())
    elif case == "bad_repo_id":
        folder, repo_id = trained_dir, "alice/not a repo!"
    elif case == "missing_folder":
        folder = tmp_path / "nowhere"
    assert main(["push", str(folder), repo_id]) == 1
    assert message in capsys.readouterr().err
    assert hub.calls == []


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_weights_are_named_with_the_fix_before_any_request(damage, trained_dir, hub, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(trained_dir, folder)
    weights = (folder / "model.safetensors").read_bytes()
    damaged = {"truncated": weights[: len(weights) // 2], "empty": b"", "garbage": b"not safetensors " * 64}
    (folder / "model.safetensors").write_bytes(damaged[damage])
    assert main(["push", str(folder), REPO]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'model.safetensors'} is damaged" in err and "Traceback" not in err
    assert "Save the model again" in err and "`ebt train` writes it at the end of a run" in err
    assert hub.calls == []
    with pytest.raises(PushError, match="model.safetensors is damaged"):  # stage() alone checks it too
        stage(folder, tmp_path / "staged", REPO)


def test_no_token_fails_before_any_request(trained_dir, hub, tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    with pytest.raises(PushError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push(trained_dir, REPO)
    assert hub.calls == []


def test_failed_upload_leaves_the_model_untouched_says_what_to_rerun_and_hides_the_token(run_dir, hub):
    before = digest(run_dir)
    hub.error = RuntimeError(f"403 Forbidden: the token {TOKEN} cannot write to {REPO}")  # an error quoting it
    with pytest.raises(PushError) as failure:
        push(run_dir, REPO, revision="dev", say=lambda _: None)
    assert f"Nothing in {run_dir} was changed" in str(failure.value)
    assert str(failure.value).endswith(f"rerun: ebt push {run_dir} {REPO} --revision dev")
    assert "the token <token> cannot write" in str(failure.value)
    assert digest(run_dir) == before
    assert TOKEN not in "".join(traceback.format_exception(failure.value))


def test_push_of_a_reference_checkpoint_converts_it_and_adds_the_byte_tokenizer(hub, capsys):
    checkpoint = require_shared(REFERENCE_FIXTURES / "default" / "reference.ckpt")
    assert main(["push", str(checkpoint), "alice/reference-ebt"]) == 0
    assert "byte-level `EBTTokenizer`" in capsys.readouterr().out
    assert hub.calls[0][1]["repo_id"] == "alice/reference-ebt"
    files = hub.uploads[0]
    assert {"model.safetensors", "tokenizer_config.json", "tokenization_ebt.py", "modeling_ebt.py"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert "Converted from a checkpoint of the reference implementation" in card.text
    assert "| peak_learning_rate | `0.0012` |" in card.text
    assert "No evaluation results were recorded" in card.text


@pytest.mark.parametrize("content", ["not a checkpoint", "namespace"])
def test_push_of_an_unsafe_or_corrupt_checkpoint_fails_clearly(content, hub, tmp_path, capsys):
    import argparse

    checkpoint = tmp_path / "bad.ckpt"
    if content == "namespace":  # hyper-parameters pickled as an object: weights_only loading refuses it
        torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1.0)}, checkpoint)
    else:
        checkpoint.write_bytes(b"this is not a pickle")
    assert main(["push", str(checkpoint), REPO]) == 1
    err = capsys.readouterr().err
    assert "cannot be loaded safely (weights_only=True)" in err and "Traceback" not in err
    assert "weights_only=False" not in err  # torch's advice to load unsafely is not passed on
    assert hub.calls == []


# --- the wire: stock clients, a Hub on loopback, clean processes ----------------------------------------------------


def hub_env(endpoint: str, hf_home: Path, token: str | None = None) -> dict:
    """A child's environment that reaches the Hub at `endpoint` (read by huggingface_hub at import) and nothing else."""
    env = {k: v for k, v in clean_env(hf_home).items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               OMP_NUM_THREADS="1")
    return {**env, "HF_TOKEN": token} if token else env


def test_push_then_load_with_remote_code_through_the_stock_client_on_loopback(run_dir, expected, tmp_path):
    before, hf_home = digest(run_dir), tmp_path / "hf_home"
    with LoopbackHub() as hub:
        run = subprocess.run([sys.executable, "-m", "modeling_ebt.cli", "push", str(run_dir), REPO], cwd=tmp_path,
                             env=hub_env(hub.endpoint, hf_home, TOKEN), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"published {hub.endpoint}/{REPO}/commit/" in run.stdout
        assert all(authorized for method, _, authorized in hub.requests if method == "POST")
        remote = load_remotely(REPO, tmp_path, hub_env(hub.endpoint, hf_home), base_model=True)  # an empty cache
    assert {"model.safetensors", "config.json", "generation_config.json", "modeling_ebt.py", "configuration_ebt.py",
            "tokenization_ebt.py", "tokenizer_config.json", "README.md", "eval_plot.png"} <= set(hub.files)
    assert digest(run_dir) == before
    assert_same_outputs(remote, expected)
    assert remote["default_steps"] == 2  # the thinking defaults of generation_config.json survive loading
    assert remote["base_model"] == "EBTModel"  # auto_map also maps AutoModel
    # the token is in no output and no file: the model folder, the client's home, what the Hub received
    written = [p.read_bytes() for folder in (run_dir, hf_home) for p in folder.rglob("*") if p.is_file()]
    assert written and not [data for data in written + list(hub.files.values()) if TOKEN.encode() in data]
    assert TOKEN not in run.stdout + run.stderr
