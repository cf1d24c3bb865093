"""A small Hugging Face Hub-compatible HTTP server for tests, backed by a temporary folder.

It implements the endpoints that the unmodified `huggingface_hub` client calls for hf-soup's flows (model info
by revision, list models by author, resolve with Range and `X-Repo-Commit`/ETag, tree, paths-info, repo
creation, preupload, ndjson commits, LFS batch and upload), with real commit SHAs and an access log. Faults can be
injected per path. Only for tests: it binds 127.0.0.1 on an ephemeral port.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

_LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".pt", ".pth", ".parquet")


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, str]  # path -> sha256 of the blob


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    main: str | None = None
    card_data: dict | None = None


class HubStore:
    """Repos, commits and blobs, on disk; thread-safe."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()

    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / digest
        if not path.exists():
            path.write_bytes(data)
        return digest

    def blob(self, digest: str) -> bytes:
        return (self.root / "blobs" / digest).read_bytes()

    def has_blob(self, digest: str) -> bool:
        return (self.root / "blobs" / digest).exists()

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
        self.commit(
            repo_id,
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
            "initial commit",
        )
        return repo

    def commit(
        self, repo_id: str, added: dict[str, bytes | str], message: str, deleted=(), replace_all=False
    ) -> str:
        """Add (`bytes`, or the sha256 of a stored blob) and delete files in one new commit; return its SHA."""
        with self.lock:
            repo = self.repos[repo_id]
            files = {} if replace_all else dict(repo.commits[repo.main].files if repo.main else {})
            if replace_all and repo.main and ".gitattributes" in repo.commits[repo.main].files:
                files[".gitattributes"] = repo.commits[repo.main].files[".gitattributes"]
            for path in deleted:
                files = {
                    p: s for p, s in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")
                }
            for path, content in added.items():
                files[path] = self.put_blob(content) if isinstance(content, bytes) else content
            payload = json.dumps([repo.main, message, sorted(files.items()), len(repo.commits)]).encode()
            sha = hashlib.sha1(payload).hexdigest()
            repo.commits[sha] = Commit(sha, repo.main, message, files)
            repo.main = sha
            if "README.md" in files:
                repo.card_data = _card_data(self.blob(files["README.md"]))
            return sha

    def resolve(self, repo_id: str, revision: str) -> Commit | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        revision = unquote(revision)
        if revision in ("main", "HEAD"):
            return repo.commits[repo.main]
        return repo.commits.get(revision)


def _card_data(readme: bytes) -> dict | None:
    import yaml

    text = readme.decode()
    if not text.startswith("---"):
        return None
    return yaml.safe_load(text.split("---", 2)[1])


# The licence identifiers the Hub accepts (a subset of its list: the common ones, plus "other").
_LICENSES = {
    "apache-2.0",
    "mit",
    "bsd-3-clause",
    "bsd-2-clause",
    "cc-by-4.0",
    "cc-by-sa-4.0",
    "cc-by-nc-4.0",
    "gpl-3.0",
    "lgpl-3.0",
    "agpl-3.0",
    "llama2",
    "llama3",
    "gemma",
    "openrail",
    "unknown",
    "other",
}
_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


def _is_repo_id(value) -> bool:
    """The Hub's repo id rules (as `huggingface_hub.utils.validate_repo_id`): `name` or `namespace/name`."""
    return (
        isinstance(value, str)
        and bool(_REPO_ID.match(value))
        and ".." not in value
        and not value.startswith((".", "-"))
        and not value.endswith(".git")
        and len(value) <= 96
    )


def metadata_errors(metadata: dict | None) -> list[str]:
    """What the Hub says about a model card's metadata: the documented rules for the fields hf-soup writes
    (`base_model`, `base_model_relation`, `license`, `datasets`, `model-index`)."""
    if not metadata:
        return []
    if not isinstance(metadata, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    base = metadata.get("base_model")
    if base is not None:
        for i, value in enumerate(
            [base] if isinstance(base, str) else base if isinstance(base, list) else [base]
        ):
            if not _is_repo_id(value):
                errors.append(f'"base_model[{i}]" with value {json.dumps(value)} is not a valid model id')
    relation = metadata.get("base_model_relation")
    if relation is not None and (relation not in _RELATIONS or base is None):
        errors.append(f'"base_model_relation" must be one of {sorted(_RELATIONS)} and needs "base_model"')
    if "license" in metadata and metadata["license"] not in _LICENSES:
        errors.append(
            f'"license" with value {json.dumps(metadata["license"])} is not a known licence identifier'
        )
    datasets = metadata.get("datasets")
    if datasets is not None:
        for i, value in enumerate([datasets] if isinstance(datasets, str) else datasets):
            if not _is_repo_id(value):
                errors.append(f'"datasets[{i}]" with value {json.dumps(value)} is not a valid dataset id')
    for i, model in enumerate(metadata.get("model-index") or []):
        for j, result in enumerate((model or {}).get("results") or []):
            where = f'"model-index[{i}].results[{j}]'
            if not isinstance((result.get("task") or {}).get("type"), str):
                errors.append(f'{where}.task.type" is required')
            dataset = result.get("dataset") or {}
            for key in ("type", "name"):
                if not isinstance(dataset.get(key), str):
                    errors.append(f'{where}.dataset.{key}" must be a string')
            for key in ("config", "split"):
                if key in dataset and dataset[key] is not None and not isinstance(dataset[key], str):
                    errors.append(f'{where}.dataset.{key}" must be a string')
            if isinstance(dataset.get("type"), str) and not _is_repo_id(dataset["type"]):
                errors.append(
                    f'{where}.dataset.type" with value {json.dumps(dataset["type"])} is not a dataset id'
                )
            for k, metric in enumerate(result.get("metrics") or []):
                if not isinstance(metric.get("type"), str):
                    errors.append(f'{where}.metrics[{k}].type" is required')
                value = metric.get("value")
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    errors.append(f'{where}.metrics[{k}].value" must be a number')
    return errors


def _readme_errors(content: str) -> list[str]:
    import yaml

    if not content.startswith("---"):
        return []
    try:
        return metadata_errors(yaml.safe_load(content.split("---", 2)[1]))
    except yaml.YAMLError as error:
        return [f"invalid YAML: {error}"]


TRUNCATE = -1  # `HubServer.inject` status: cut the answer's body mid-transfer


class HubServer:
    """Start with `HubServer(root).start()`; `url` is the endpoint. `tokens` maps tokens to user names."""

    def __init__(self, root: Path):
        self.store = HubStore(root)
        self.log: list[tuple[str, str, int]] = []  # (method, path, status); ranged reads log as "GET-RANGE"
        self.served: list[tuple[str, int]] = []  # (path, body bytes) of every file resolved: the traffic
        self.tokens: dict[str, str] = {}
        self.faults: list[dict] = []  # {"method", "pattern", "status", "times"}
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> HubServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, method: str, pattern: str, status: int, times: int = 1_000, from_byte: int = 0) -> None:
        """Answer the next `times` requests whose path matches `pattern` with `status`.

        `status=0` drops the connection instead, after reading half the request body (an interrupted upload).
        `status=TRUNCATE` sends the real answer's headers and half its body, then drops the connection (a download
        cut mid-transfer); with `from_byte`, only for ranged reads that start at or after that byte.
        """
        self.faults.append(
            {
                "method": method,
                "pattern": re.compile(pattern),
                "status": status,
                "times": times,
                "from_byte": from_byte,
            }
        )

    def bytes_served(self, contains: str = "", suffix: str = "") -> int:
        """Bytes of file content sent (ranged reads and downloads) for paths containing `contains`, ending with
        `suffix`."""
        return sum(size for path, size in self.served if contains in path and path.endswith(suffix))

    def requests(self, method: str | None = None, contains: str = "") -> list[str]:
        return [p for m, p, _ in self.log if (method is None or m == method) and contains in p]

    def upload_folder(
        self, repo_id: str, folder: Path, private: bool = False, message: str = "upload"
    ) -> str:
        """Seed a repo directly (bypassing HTTP) with every file of `folder`."""
        if repo_id not in self.store.repos:
            self.store.create_repo(repo_id, private)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return self.store.commit(repo_id, files, message)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean; the access log is `hub.log`
        pass

    # --- plumbing -------------------------------------------------------------------------------------------
    def _user(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return self.hub.tokens.get(auth.removeprefix("Bearer ").strip()) if auth else None

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        method = "GET-RANGE" if self.command == "GET" and self.headers.get("range") else self.command
        truncate = getattr(self, "truncate", False)
        self.hub.log.append((method, self.path, TRUNCATE if truncate else status))
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if truncate:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if not head and body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None) -> None:
        self._send(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _fault(self) -> bool:
        self.truncate = False
        for fault in self.hub.faults:
            if (
                fault["times"] > 0
                and fault["method"] in (self.command, "*")
                and fault["pattern"].search(self.path)
                and self._range_start() >= fault["from_byte"]
            ):
                fault["times"] -= 1
                if fault["status"] == TRUNCATE:
                    self.truncate = True  # answered normally, then cut (`_send`)
                    return False
                if fault["status"] == 0:
                    self.rfile.read(int(self.headers.get("content-length") or 0) // 2)
                    self.close_connection = True
                    self.hub.log.append((self.command, self.path, 0))
                    return True
                self._body()
                self._error(fault["status"], "Injected", f"injected fault {fault['status']}")
                return True
        return False

    def _range_start(self) -> int:
        match = re.match(r"bytes=(\d+)-", self.headers.get("range") or "")
        return int(match[1]) if match else 0

    def _readable(self, repo_id: str) -> Repo | None:
        repo = self.hub.store.repos.get(repo_id)
        if repo is None or (repo.private and self._user() != repo_id.split("/")[0]):
            code = 401 if self._user() is None else 404
            self._error(code, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _writable(self, repo_id: str) -> Repo | None:
        user = self._user()
        if user is None:
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return None
        if repo_id.split("/")[0] != user:
            self._error(403, "Forbidden", f"You don't have the rights to write to {repo_id}")
            return None
        repo = self.hub.store.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    # --- dispatch -------------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self, head: bool = False) -> None:
        if self._fault():
            return
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        routes = [
            ("GET", r"^/api/whoami-v2$", self._whoami),
            ("GET", r"^/api/models$", self._list_models),
            ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)(/revision/(?P<rev>[^/]+))?$", self._model_info),
            ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(/(?P<sub>.*))?$", self._tree),
            ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)$", self._paths_info),
            ("POST", r"^/api/repos/create$", self._create_repo),
            ("DELETE", r"^/api/repos/delete$", self._delete_repo),
            ("POST", r"^/api/validate-yaml$", self._validate_yaml),
            ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$", self._preupload),
            ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$", self._commit),
            ("POST", r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$", self._lfs_batch),
            ("PUT", r"^/_lfs/(?P<oid>[0-9a-f]{64})$", self._lfs_put),
            ("GET", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
        ]
        method = "GET" if head else self.command
        for route_method, pattern, handler in routes:
            match = re.match(pattern, path)
            if route_method == method and match:
                kwargs = {k: v for k, v in match.groupdict().items() if v is not None or k == "sub"}
                return (
                    handler(query=query, head=head, **kwargs)
                    if handler == self._resolve
                    else handler(query=query, **kwargs)
                )
        self._error(404, "NotFound", f"no route for {self.command} {path}")

    # --- endpoints ------------------------------------------------------------------------------------------
    def _whoami(self, query) -> None:
        user = self._user()
        if user is None:
            return self._error(401, "Unauthorized", "Invalid credentials")
        self._json(200, {"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token"}})

    def _info(self, repo: Repo, commit: Commit) -> dict:
        siblings = [
            {"rfilename": p, "size": len(self.hub.store.blob(s))} for p, s in sorted(commit.files.items())
        ]
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit.sha,
            "private": repo.private,
            "tags": [],
            "siblings": siblings,
            "cardData": repo.card_data,
            "lastModified": "2026-01-01T00:00:00.000Z",
        }

    def _list_models(self, query) -> None:
        author = (query.get("author") or [None])[0]
        out = []
        for repo in self.hub.store.repos.values():
            if author and not repo.repo_id.startswith(author + "/"):
                continue
            if repo.private and self._user() != repo.repo_id.split("/")[0]:
                continue
            out.append(self._info(repo, repo.commits[repo.main]))
        self._json(200, sorted(out, key=lambda r: r["id"]))

    def _model_info(self, query, repo, rev="main") -> None:
        found = self._readable(repo)
        if found is None:
            return
        commit = self.hub.store.resolve(repo, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        self._json(200, self._info(found, commit))

    def _entries(self, commit: Commit, paths) -> list[dict]:
        entries = []
        for path in paths:
            if path in commit.files:
                digest = commit.files[path]
                size = len(self.hub.store.blob(digest))
                entry = {"type": "file", "path": path, "size": size, "oid": digest[:40]}
                if path.endswith(_LFS_SUFFIXES):
                    entry["lfs"] = {"oid": digest, "size": size, "pointerSize": 130}
                entries.append(entry)
        return entries

    def _tree(self, query, repo, rev, sub=None) -> None:
        if self._readable(repo) is None:
            return
        commit = self.hub.store.resolve(repo, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        prefix = (sub or "").strip("/")
        paths = [p for p in sorted(commit.files) if not prefix or p.startswith(prefix + "/")]
        self._json(200, self._entries(commit, paths))

    def _paths_info(self, query, repo, rev) -> None:
        if self._readable(repo) is None:
            return
        commit = self.hub.store.resolve(repo, rev)
        body = self._body().decode()
        form = parse_qs(body) if not body.startswith("{") else json.loads(body)
        paths = form.get("paths", [])
        self._json(200, self._entries(commit, paths if isinstance(paths, list) else [paths]))

    def _resolve(self, query, repo, rev, file, head=False) -> None:
        if self._readable(repo) is None:
            return
        commit = self.hub.store.resolve(repo, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if file not in commit.files:
            return self._error(404, "EntryNotFound", f"{file} does not exist on {rev}")
        digest = commit.files[file]
        data = self.hub.store.blob(digest)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{digest}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if file.endswith(_LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data))})
        status, body = 200, data
        range_header = self.headers.get("range")
        if range_header and not head:
            start, _, end = range_header.removeprefix("bytes=").partition("-")
            start = int(start)
            end = min(int(end) if end else len(data) - 1, len(data) - 1)
            body = data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        if not head:
            self.hub.served.append((self.path, len(body)))
        self._send(status, body, headers, head=head)

    def _create_repo(self, query) -> None:
        user = self._user()
        payload = json.loads(self._body() or b"{}")
        if user is None:
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user:
            return self._error(
                403, "Forbidden", f"You don't have the rights to create a repo under {namespace}"
            )
        if repo_id in self.hub.store.repos:
            return self._json(
                409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"}
            )
        self.hub.store.create_repo(repo_id, bool(payload.get("private")))
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _delete_repo(self, query) -> None:
        payload = json.loads(self._body() or b"{}")
        repo_id = (
            f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        )
        if self._writable(repo_id) is None:
            return
        with self.hub.store.lock:
            del self.hub.store.repos[repo_id]
        self._send(200)

    def _validate_yaml(self, query) -> None:
        errors = _readme_errors(json.loads(self._body()).get("content", ""))
        if errors:
            return self._json(400, {"errors": [{"message": e} for e in errors], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, query, repo, rev) -> None:
        if self._writable(repo) is None:
            return
        files = json.loads(self._body())["files"]
        modes = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(_LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
            }
            for f in files
        ]
        self._json(200, {"files": modes, "commitOid": self.hub.store.repos[repo].main})

    def _lfs_batch(self, query, repo) -> None:
        if self._writable(repo) is None:
            return
        payload = json.loads(self._body())
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.hub.store.has_blob(obj["oid"]):
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/_lfs/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, query, oid) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "BadOid", "content does not match oid")
        self.hub.store.put_blob(data)
        self._send(200)

    def _commit(self, query, repo, rev) -> None:
        if self._writable(repo) is None:
            return
        added: dict[str, bytes | str] = {}
        deleted: list[str] = []
        summary = "commit"
        for line in self._body().decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", summary)
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if not self.hub.store.has_blob(value["oid"]):
                    return self._error(422, "MissingLfs", f"LFS object {value['oid']} was never uploaded")
                added[value["path"]] = value["oid"]
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
        readme = added.get("README.md")
        errors = _readme_errors(readme.decode()) if isinstance(readme, bytes) else []
        if errors:  # the Hub validates README metadata on every commit
            message = "Invalid metadata in README.md: " + "; ".join(errors)
            return self._error(400, "BadRequest", message)
        sha = self.hub.store.commit(repo, added, summary, deleted)
        self._json(
            200,
            {
                "commitUrl": f"{self.hub.url}/{repo}/commit/{sha}",
                "commitOid": sha,
                "success": True,
                "pullRequestUrl": None,
            },
        )
