"""The Hub path end to end: the real CLI and the unmodified `huggingface_hub` client against a local test Hub."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_model, installed_script, tiny_config
from hub_server import HubServer
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

HF_SOUP = installed_script("hf-soup")
TOKEN = "hf_test_token_org"
NO_BACKOFF = Path(__file__).parent / "no_backoff"


def card(base: str) -> str:
    return f"---\nbase_model: {base}\nlibrary_name: transformers\n---\n# fine-tune\n"


@pytest.fixture
def hub(tmp_path, zoo):
    server = HubServer(tmp_path / "hub").start()
    server.tokens[TOKEN] = "org"
    server.upload_folder("org/base", zoo["base"])
    for key in "abcd":
        folder = copy_model(zoo[key], tmp_path / "seed" / key)
        (folder / "README.md").write_text(card("org/base"))
        server.upload_folder(f"org/ft-{key}", folder)
    wide = tmp_path / "seed" / "wide"  # declares the base, but its shapes differ: rejected from headers
    BertForSequenceClassification(tiny_config(hidden_size=48, intermediate_size=96)).save_pretrained(wide)
    (wide / "README.md").write_text(card("org/base"))
    server.upload_folder("org/ft-wide", wide)
    stranger = copy_model(zoo["a"], tmp_path / "seed" / "stranger")  # fine-tuned from some other base
    (stranger / "README.md").write_text(card("someone/else"))
    server.upload_folder("org/ft-stranger", stranger)
    yield server
    server.stop()


def hub_env(server, tmp_path, token=TOKEN, offline=False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=server.url if server else "http://127.0.0.1:9",
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_SOUP_CACHE=str(tmp_path / "soup_cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_DATASETS_OFFLINE="1",
    )
    # The retries run, without their backoff waits (tests/no_backoff/sitecustomize.py).
    env["PYTHONPATH"] = os.pathsep.join([str(NO_BACKOFF), *filter(None, [os.environ.get("PYTHONPATH")])])
    if token:
        env["HF_TOKEN"] = token
    return env


def run(args, env, timeout=600):
    return subprocess.run([HF_SOUP, *args], capture_output=True, text=True, env=env, timeout=timeout)


def data_args(reviews):
    return [
        "--dataset",
        str(reviews["train"]),
        "--report-split",
        str(reviews["test"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--max-length",
        "64",
        "--selection-fraction",
        "0.25",
        "--max-eval-examples",
        "60",
    ]


@pytest.mark.slow
def test_full_hub_session(hub, tmp_path, reviews):
    env = hub_env(hub, tmp_path)
    commits_before = len(hub.store.repos["org/ft-a"].commits)
    cooked = run(
        [
            "--base",
            "org/base",
            "--candidates",
            "org/ft-*",
            *data_args(reviews),
            "--recipe",
            "greedy",
            "--push-to",
            "org/soup",
            "--format",
            "json",
            "--quiet",
        ],
        env,
    )
    assert cooked.returncode == 0, cooked.stderr
    report = json.loads(cooked.stdout)

    # Discovery: the glob listed org/ft-*, the base filter and the header check rejected the odd ones.
    accepted = report["compatibility"]["accepted"]
    assert sorted(accepted) == ["org/ft-a", "org/ft-b", "org/ft-c", "org/ft-d"]
    reasons = {r["id"]: r["reason"] for r in report["compatibility"]["rejected"]}
    assert (
        "someone/else" not in reasons.get("org/ft-stranger", "")
        and "base_model" in reasons["org/ft-stranger"]
    )
    assert "shape" in reasons["org/ft-wide"]
    print(cooked.stderr)  # the discovery table, for the closing note

    # Pinning: every ingredient carries the SHA it was read at.
    for ingredient in report["mixture"]["ingredients"]:
        assert ingredient["revision"] == hub.store.repos[ingredient["id"]].main
    assert report["mixture"]["base"]["revision"] == hub.store.repos["org/base"].main

    # Check before download: the rejected repos' weights were only read through Range requests (headers).
    for rejected in ("org/ft-wide", "org/ft-stranger"):
        assert not [p for p in hub.requests("GET", rejected) if p.endswith(".safetensors")]
    assert hub.requests("GET-RANGE", "org/ft-wide/resolve")

    # One commit, holding weights, manifest, card and plots.
    soup = hub.store.repos["org/soup"]
    assert len(soup.commits) == 2  # the repo's initial commit + the soup
    files = soup.commits[soup.main].files
    assert {"model.safetensors", "config.json", "soup.json", "README.md", "plots/trajectory.png"} <= set(
        files
    )
    assert soup.commits[soup.main].message.startswith("hf-soup: greedy soup of")
    assert report["push"]["commit_url"].endswith(soup.main)

    # The card, read back with ModelCard.load against the server.
    script = (
        "import json; from huggingface_hub import ModelCard; d = ModelCard.load('org/soup').data; "
        "print(json.dumps([d.base_model, d.base_model_relation, d.eval_results[0].metric_type]))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    base_model, relation, metric = json.loads(loaded.stdout)
    assert base_model == [i["id"] for i in report["mixture"]["ingredients"]]
    assert relation == "merge" and metric == "accuracy"
    card = hub.store.blob(files["README.md"]).decode()
    for ingredient in report["mixture"]["ingredients"]:  # Hub ingredients by their ids, pinned
        assert f"| `{ingredient['id']}` @ `{ingredient['revision'][:12]}` |" in card

    # A candidate changes on the Hub after the run: reproduce still uses the pinned SHAs and passes.
    changed = copy_model(tmp_path / "seed" / "a", tmp_path / "changed")
    state = load_file(str(changed / "model.safetensors"))
    state["classifier.bias"] += 1.0
    save_file(state, str(changed / "model.safetensors"), metadata={"format": "pt"})
    hub.upload_folder("org/ft-a", changed, message="retrained")
    assert len(hub.store.repos["org/ft-a"].commits) == commits_before + 1
    reproduced = run(["reproduce", "org/soup"], env)
    assert reproduced.returncode == 0, reproduced.stderr
    assert "Reproduced bit-exactly" in reproduced.stdout and "FAIL" not in reproduced.stdout
    print(reproduced.stdout)

    # Tamper with one published tensor: reproduce names the group and exits non-zero.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    weights = load_file(str(Path(hub.store.root) / "blobs" / files["model.safetensors"]))
    weights["classifier.weight"] = weights["classifier.weight"] * 1.001
    save_file(weights, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    hub.upload_folder("org/soup", tampered, message="tamper")
    failed = run(["reproduce", "org/soup"], env)
    assert failed.returncode == 1
    assert "classifier" in failed.stdout and "FAIL" in failed.stdout and "MISMATCH" in failed.stdout


@pytest.mark.slow
def test_offline_with_a_warm_cache(hub, tmp_path):
    args = [
        "--base",
        "org/base",
        "--candidates",
        "org/ft-a",
        "org/ft-b@main",
        "--recipe",
        "uniform",
        "--format",
        "json",
        "--quiet",
    ]
    online = run([*args, "--output", str(tmp_path / "online")], hub_env(hub, tmp_path))
    assert online.returncode == 0, online.stderr
    hub.stop()  # no server at all from here on
    offline = run([*args, "--output", str(tmp_path / "offline")], hub_env(None, tmp_path, offline=True))
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["mixture"] == json.loads(online.stdout)["mixture"]
    globbed = run(
        ["check", "--base", "org/base", "--candidates", "org/ft-[ab]"], hub_env(None, tmp_path, offline=True)
    )
    assert globbed.returncode == 0 and "org/ft-a" in globbed.stdout and "org/ft-b" in globbed.stdout


@pytest.mark.slow
def test_private_repo_without_token(hub, tmp_path):
    hub.upload_folder("org/secret-ft", tmp_path / "seed" / "a", private=True)
    result = run(
        ["check", "--base", "org/base", "--candidates", "org/ft-a", "org/secret-ft"],
        hub_env(hub, tmp_path, token=None),
    )
    assert result.returncode == 2
    assert "org/secret-ft: repository not found" in result.stderr and "HF_TOKEN" in result.stderr
    with_token = run(
        ["check", "--base", "org/base", "--candidates", "org/ft-a", "org/secret-ft"], hub_env(hub, tmp_path)
    )
    assert with_token.returncode == 0, with_token.stderr


def test_no_match_is_a_clear_error(hub, tmp_path):
    result = run(
        [
            "--base",
            "org/base",
            "--candidates",
            "org/zzz-*",
            "--recipe",
            "uniform",
            "--output",
            str(tmp_path / "out"),
        ],
        hub_env(hub, tmp_path),
    )
    assert result.returncode == 2 and "No candidate matches org/zzz-*" in result.stderr
    assert not (tmp_path / "out").exists()


def test_server_error_mid_download_leaves_nothing(hub, tmp_path):
    hub.inject("GET", r"^/org/ft-b/resolve/[0-9a-f]+/model\.safetensors$", 500)
    result = run(
        [
            "--base",
            "org/base",
            "--candidates",
            "org/ft-a",
            "org/ft-b",
            "--recipe",
            "uniform",
            "--output",
            str(tmp_path / "out"),
            "--push-to",
            "org/soup",
        ],
        hub_env(hub, tmp_path),
    )
    assert result.returncode == 2
    assert "HTTP 500" in result.stderr and "Traceback" not in result.stderr
    assert len(hub.requests("GET", "/org/ft-b/resolve")) > 1  # the client's own retries ran
    assert not (tmp_path / "out").exists() and "org/soup" not in hub.store.repos


@pytest.mark.slow
def test_push_errors_are_clear_and_commit_nothing(hub, tmp_path):
    args = ["--base", "org/base", "--candidates", "org/ft-a", "org/ft-b", "--recipe", "uniform"]
    denied = run([*args, "--push-to", "someone-else/soup"], hub_env(hub, tmp_path))
    assert denied.returncode == 2 and "HTTP 403" in denied.stderr and "HF_TOKEN" in denied.stderr
    assert "someone-else/soup" not in hub.store.repos
    hub.upload_folder("org/taken", tmp_path / "seed" / "a")
    refused = run([*args, "--push-to", "org/taken"], hub_env(hub, tmp_path))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert len(hub.store.repos["org/taken"].commits) == 2
    replaced = run([*args, "--push-to", "org/taken", "--overwrite"], hub_env(hub, tmp_path))
    assert replaced.returncode == 0, replaced.stderr
    taken = hub.store.repos["org/taken"]
    assert len(taken.commits) == 3 and "README.md" in taken.commits[taken.main].files
    assert "soup.json" in taken.commits[taken.main].files


def test_hf_cli_dispatches_to_hf_soup(tmp_path):
    """`hf soup ...` runs the installed `hf-soup`, registered the way `hf extensions install` does."""
    from datetime import datetime, timezone

    from huggingface_hub.cli.extensions import ExtensionManifest

    home = tmp_path / "home"
    manifest = ExtensionManifest(
        owner="hf-soup",
        repo="hf-soup",
        repo_id="hf-soup/hf-soup",
        short_name="soup",
        executable_path=HF_SOUP,
        type="python",
        installed_at=datetime.now(timezone.utc),
    )
    manifest.save(home / ".local" / "share" / "hf" / "extensions" / "hf-soup")
    env = {**hub_env(None, tmp_path, offline=True), "HOME": str(home)}
    result = subprocess.run(
        # The `hf` CLI of this environment, wherever huggingface_hub's own scripts were installed.
        [sys.executable, "-m", "huggingface_hub.cli.hf", "soup", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: hf-soup" in result.stdout and "reproduce" in result.stdout


def test_bad_token_on_push_is_refused_and_commits_nothing(hub, tmp_path):
    args = ["--base", "org/base", "--candidates", "org/ft-a", "org/ft-b", "--recipe", "uniform"]
    result = run([*args, "--push-to", "org/soup"], hub_env(hub, tmp_path, token="hf_not_a_valid_token"))
    assert result.returncode == 2 and "HTTP 401" in result.stderr and "HF_TOKEN" in result.stderr
    assert result.stderr.count("hf-soup: error:") == 1 and "Traceback" not in result.stderr
    assert "org/soup" not in hub.store.repos


@pytest.mark.slow
def test_interrupted_upload_commits_nothing_and_removes_the_new_repo(hub, tmp_path):
    hub.inject("PUT", r"^/_lfs/", 0)  # the server drops the connection halfway through every LFS upload
    args = ["--base", "org/base", "--candidates", "org/ft-a", "org/ft-b", "--recipe", "uniform"]
    result = run([*args, "--push-to", "org/soup"], hub_env(hub, tmp_path))
    assert result.returncode == 2, result.stdout
    assert result.stderr.count("hf-soup: error:") == 1 and "Pushing to org/soup" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p for m, p, status in hub.log if m == "PUT" and status == 0]  # the upload really was cut off
    assert not hub.requests("POST", "/api/models/org/soup/commit")  # no commit was even attempted
    assert "org/soup" not in hub.store.repos  # the repo this push created was deleted again


def test_a_file_name_that_escapes_the_cache_is_refused(hub, tmp_path):
    folder = tmp_path / "seed" / "a"
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    hub.store.create_repo("org/ft-evil")
    hub.store.commit("org/ft-evil", {**files, "../../evil.safetensors": b"x" * 64}, "traversal")
    result = run(
        [
            "--base",
            "org/base",
            "--candidates",
            "org/ft-a",
            "org/ft-evil",
            "--recipe",
            "uniform",
            "--output",
            str(tmp_path / "out"),
        ],
        hub_env(hub, tmp_path),
    )
    assert result.returncode == 2 and "unsafe file name" in result.stderr and "'..'" in result.stderr
    assert not list(tmp_path.rglob("evil.safetensors")) and not (tmp_path / "out").exists()


def test_a_revision_that_no_longer_exists(hub, tmp_path):
    gone = "0" * 40
    result = run(
        ["check", "--base", "org/base", "--candidates", "org/ft-a", f"org/ft-b@{gone}"],
        hub_env(hub, tmp_path),
    )
    assert result.returncode == 2
    assert f"org/ft-b@{gone}: no such revision" in result.stderr and "Traceback" not in result.stderr


def test_a_dataset_repo_is_not_a_candidate(hub, tmp_path):
    result = run(
        ["check", "--base", "org/base", "--candidates", "org/ft-a", "org/reviews-dataset"],
        hub_env(hub, tmp_path),
    )
    assert result.returncode == 2
    assert "org/reviews-dataset: repository not found" in result.stderr and "model repo" in result.stderr


@pytest.mark.slow
def test_the_token_never_appears_in_any_output(hub, tmp_path, reviews):
    """Grep every byte hf-soup produced (streams, output folder, plots, caches, pushed files) for the token."""
    out = tmp_path / "out"
    args = [
        "--base",
        "org/base",
        "--candidates",
        "org/ft-*",
        "--recipe",
        "greedy",
        *data_args(reviews),
        "--output",
        str(out),
        "--push-to",
        "org/soup",
    ]
    env = {**hub_env(hub, tmp_path), "HF_SOUP_DEBUG": "0"}  # "0" means off, as unset
    ok = run(args, env)
    assert ok.returncode == 0, ok.stderr
    failed = run(
        [*args[:-2], "--push-to", "someone-else/soup", "--overwrite"], env
    )  # a 403, with a traceback-free error
    assert failed.returncode == 2
    produced = [ok.stdout, ok.stderr, failed.stdout, failed.stderr]
    token = TOKEN.encode()
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "hub" not in p.relative_to(tmp_path).parts[:1]]
    assert any(p.suffix == ".png" for p in files) and any(p.name == "soup.json" for p in files)
    assert all(TOKEN not in text for text in produced)
    leaked = [p for p in files if token in p.read_bytes()]
    assert leaked == []
    pushed = hub.store.repos["org/soup"].commits[hub.store.repos["org/soup"].main].files
    assert all(token not in hub.store.blob(digest) for digest in pushed.values())


@pytest.mark.slow
def test_a_soup_of_local_candidates_pushes_no_local_path(hub, zoo, reviews, tmp_path):
    """The Hub accepts the card (validated like the real one) and no pushed byte names this machine's paths."""
    env = hub_env(hub, tmp_path)
    cooked = run(
        [
            "--base",
            str(zoo["base"]),
            "--candidates",
            str(zoo["root"] / "runs" / "*"),
            *data_args(reviews),
            "--output",
            str(tmp_path / "soup"),
            "--push-to",
            "org/local-soup",
            "--format",
            "json",
            "--quiet",
        ],
        env,
    )
    assert cooked.returncode == 0, cooked.stderr
    repo = hub.store.repos["org/local-soup"]
    files = repo.commits[repo.main].files
    assert {"model.safetensors", "soup.json", "README.md", "plots/trajectory.png"} <= set(files)
    machine = {
        os.path.commonpath([tmp_path, zoo["root"], reviews["train"]]),
        str(Path.cwd()),
        str(Path.home()),
    }
    for path, digest in files.items():
        content = hub.store.blob(digest)
        assert not [prefix for prefix in machine if prefix.encode() in content], path
    metadata = _card_metadata(hub.store.blob(files["README.md"]))
    assert "base_model" not in metadata  # local ingredients have no Hub id to list
    # Local data: a readable name (its folder's, for a split-named file) and the builder that read it, not a path
    # and not a Hub dataset; the split by its name.
    dataset = metadata["model-index"][0]["results"][0]["dataset"]
    assert dataset == {"name": reviews["train"].parent.name, "type": "csv", "split": "test"}


def _card_metadata(readme: bytes) -> dict:
    import yaml

    return yaml.safe_load(readme.decode().split("---", 2)[1])


def test_the_test_hub_rejects_metadata_the_hub_rejects(hub, tmp_path):
    """Like the real Hub: `/api/validate-yaml` (which the client asks before any upload) and the commit itself both
    refuse README metadata with a path in `base_model`, an unknown relation or licence, a path as a dataset id, or
    a non-numeric metric."""
    import base64
    import urllib.error
    import urllib.request

    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("org/cards")
    bad = {
        "base_model: /tmp/runs/a": "base_model[0]",
        "base_model: org/x\nbase_model_relation: blend": "base_model_relation",
        "license: my-own": "license",
        "datasets:\n- ./train.csv": "datasets[0]",
        "model-index:\n- name: x\n  results:\n  - task: {type: text-classification}\n    dataset: {type: d, name: d}\n"
        "    metrics: [{type: accuracy, value: high}]": "metrics[0].value",
    }
    for metadata, field in bad.items():
        readme = f"---\n{metadata}\n---\n# card\n".encode()
        with pytest.raises(ValueError, match=re.escape(field)):
            api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id="org/cards")
        # The commit endpoint refuses it too, for a client that skips the check.
        lines = [
            {"key": "header", "value": {"summary": "card"}},
            {
                "key": "file",
                "value": {
                    "path": "README.md",
                    "content": base64.b64encode(readme).decode(),
                    "encoding": "base64",
                },
            },
        ]
        request = urllib.request.Request(
            f"{hub.url}/api/models/org/cards/commit/main",
            data="\n".join(json.dumps(line) for line in lines).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"},
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        assert error.value.code == 400 and field in error.value.read().decode()
    api.upload_file(path_or_fileobj=card("org/base").encode(), path_in_repo="README.md", repo_id="org/cards")
    assert "README.md" in hub.store.repos["org/cards"].commits[hub.store.repos["org/cards"].main].files


@pytest.mark.slow
def test_a_card_the_hub_would_reject_is_refused_before_any_upload(hub, zoo, tmp_path):
    env = hub_env(hub, tmp_path)
    folder = tmp_path / "soup"
    merged = run(
        [
            "--base",
            str(zoo["base"]),
            "--candidates",
            str(zoo["a"]),
            str(zoo["b"]),
            "--recipe",
            "uniform",
            "--output",
            str(folder),
        ],
        env,
    )
    assert merged.returncode == 0, merged.stderr
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("---\n", f"---\nbase_model: {zoo['a']}\n", 1))
    pushed = run(["push", str(folder), "--to", "org/rejected"], env)
    assert pushed.returncode == 2 and pushed.stderr.count("hf-soup: error:") == 1, pushed.stderr
    assert "base_model[0]" in pushed.stderr and "nothing was uploaded" in pushed.stderr
    assert "org/rejected" not in hub.store.repos and not hub.requests("PUT", "_lfs")


def test_check_reads_headers_and_downloads_no_weights(hub, tmp_path):
    result = run(
        ["check", "--base", "org/base", "--candidates", "org/ft-*", "--format", "json"],
        hub_env(hub, tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)["accepted"]) == ["org/ft-a", "org/ft-b", "org/ft-c", "org/ft-d"]
    assert not [path for path in hub.requests("GET") if path.endswith(".safetensors")]  # no full weight file
    assert hub.requests("GET-RANGE", "org/base/resolve") and hub.requests("GET-RANGE", "org/ft-a/resolve")
