"""A tiny Hub stand-in on 127.0.0.1 for upload tests (no internet): just enough of the Hugging Face Hub HTTP API for
``HfApi(endpoint=...).create_repo`` + ``upload_folder`` (huggingface_hub 2.4) to run unchanged.

Implemented (request and response shapes follow huggingface_hub's client code, ``hf_api.py`` / ``_commit_api.py`` /
``lfs.py``):

* ``POST /api/repos/create`` -> ``{"url"}`` (409 when the repo exists; ``create_repo(exist_ok=True)`` accepts it);
* ``POST /api/validate-yaml`` -> the README front matter must parse as a YAML mapping (400 with ``errors`` if not);
* ``POST /api/models/{repo}/preupload/{rev}`` -> ``uploadMode`` per file: ``"lfs"`` for names ending in one of
  ``lfs_suffixes`` (as the real Hub does for ``*.safetensors``), else ``"regular"`` (content inline in the commit);
* ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT /lfs/{oid}`` + ``POST /lfs/{oid}/verify``: the git-LFS
  "basic" transfer (the client uses it when ``hf_xet`` is disabled; the Xet storage protocol is NOT implemented,
  so LFS-mode files need ``HF_HUB_DISABLE_XET``);
* ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, ``file`` base64, ``lfsFile`` by sha256, deletions).

Anything else answers 404 and is recorded in ``unexpected``. Bounded: at most ``max_requests`` requests and
``max_body`` bytes per body, and the server shuts itself down after ``lifetime_s`` seconds.
"""

import base64
import hashlib
import json
import re
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


class LoopbackHub:
    """Context manager: ``with LoopbackHub() as hub: HfApi(endpoint=hub.endpoint)...``; then inspect
    ``hub.repos[repo_id]`` (``{"private", "files": {path: bytes}, "commits": [summary, ...]}``), ``hub.auth``
    (Authorization headers seen), ``hub.requests`` ((method, path) in order) and ``hub.unexpected``."""

    def __init__(self, lfs_suffixes=(), max_requests: int = 500, max_body: int = 64 << 20, lifetime_s: float = 300):
        self.lfs_suffixes = tuple(lfs_suffixes)
        self.max_requests, self.max_body, self.lifetime_s = max_requests, max_body, lifetime_s
        self.repos, self.lfs, self.auth, self.requests, self.unexpected = {}, {}, set(), [], []
        self.lock = threading.Lock()
        self._server = self._thread = self._timer = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response sets Content-Length
    hub: LoopbackHub = None

    def log_message(self, *args):  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                if len(out) + size > self.hub.max_body:
                    raise ValueError("body too large")
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def _send(self, status: int, payload=None, content_type="application/json"):
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status >= 400 and isinstance(payload, dict) and "error" in payload:
            self.send_header("X-Error-Message", payload["error"])
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str):
        hub = self.hub
        path = self.path.split("?")[0]
        with hub.lock:
            hub.requests.append((method, path))
            too_many = len(hub.requests) > hub.max_requests
            if self.headers.get("Authorization"):
                hub.auth.add(self.headers["Authorization"])
        try:
            body = self._body()
        except ValueError as exc:
            return self._send(413, {"error": str(exc)})
        if too_many:
            return self._send(503, {"error": "request limit of the test server reached"})
        try:
            self._route(method, path, body)
        except Exception as exc:  # a bug in a request: report it as a server error the client surfaces
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    # ------------------------------------------------------------------ API
    def _route(self, method, path, body):
        hub = self.hub
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
            with hub.lock:
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": repo_id})
                hub.repos[repo_id] = {"private": req.get("visibility") == "private", "files": {}, "commits": []}
            return self._send(200, {"url": f"{hub_endpoint(self)}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
            try:
                meta = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as exc:
                meta, error = None, str(exc)
            else:
                error = "README.md front matter is missing or not a mapping"
            if not isinstance(meta, dict):
                return self._send(400, {"error": error, "errors": [{"message": error}], "warnings": []})
            return self._send(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if method == "POST" and m:
            repo_id, what = m.group(1), m.group(2)
            if repo_id not in hub.repos:
                return self._send(404, {"error": "Repository not found"})
            if what == "preupload":
                files = json.loads(body)["files"]
                return self._send(200, {"files": [
                    {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(hub.lfs_suffixes) else "regular",
                     "shouldIgnore": False, "oid": None} for f in files]})
            return self._commit(repo_id, body)
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if method == "POST" and m:
            req = json.loads(body)
            objects = []
            for o in req["objects"]:
                obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] not in hub.lfs:  # no actions = already stored upstream, as git-LFS servers answer
                    obj["actions"] = {"upload": {"href": f"{hub_endpoint(self)}/lfs/{o['oid']}"},
                                      "verify": {"href": f"{hub_endpoint(self)}/lfs/{o['oid']}/verify"}}
                objects.append(obj)
            return self._send(200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")
        m = re.fullmatch(r"/lfs/([0-9a-f]{64})(/verify)?", path)
        if m and method == "PUT" and not m.group(2):
            if hashlib.sha256(body).hexdigest() != m.group(1):
                return self._send(400, {"error": "sha256 of the uploaded content does not match its oid"})
            with hub.lock:
                hub.lfs[m.group(1)] = body
            return self._send(200)
        if m and method == "POST" and m.group(2):
            req = json.loads(body)
            stored = hub.lfs.get(m.group(1))
            if stored is None or len(stored) != req["size"]:
                return self._send(404, {"error": "LFS object not uploaded"})
            return self._send(200, {})
        with hub.lock:
            hub.unexpected.append((method, path))
        return self._send(404, {"error": f"not implemented by the test server: {method} {path}"})

    def _commit(self, repo_id, body):
        hub = self.hub
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._send(400, {"error": "commit payload must start with a header line"})
        files = dict(hub.repos[repo_id]["files"])
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                if value.get("encoding") != "base64":
                    return self._send(400, {"error": "only base64 file content is supported"})
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                blob = hub.lfs.get(value["oid"])
                if blob is None:
                    return self._send(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                files[value["path"]] = blob
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif item["key"] == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                return self._send(400, {"error": f"unknown commit operation {item['key']}"})
        oid = hashlib.sha1(body).hexdigest()
        with hub.lock:
            hub.repos[repo_id]["files"] = files
            hub.repos[repo_id]["commits"].append(lines[0]["value"]["summary"])
        return self._send(200, {"commitUrl": f"{hub_endpoint(self)}/{repo_id}/commit/{oid}", "commitOid": oid,
                                "pullRequestUrl": None})


def hub_endpoint(handler) -> str:
    host, port = handler.server.server_address[:2]
    return f"http://{host}:{port}"


def safetensors_parts(blob: bytes):
    """(header dict, data bytes) of a .safetensors file: its metadata key order is not deterministic (a Rust hash
    map), its content is."""
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def same_files(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """Assert two ``{path: bytes}`` file sets are equal (``.safetensors`` compared by header content + data)."""
    assert sorted(a) == sorted(b)
    for path in a:
        if path.endswith(".safetensors"):
            assert safetensors_parts(a[path]) == safetensors_parts(b[path]), path
        else:
            assert a[path] == b[path], path
