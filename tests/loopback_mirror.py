"""A loopback HTTP server standing in for the datasets' hosts (tests/test_fetch.py, bench/bench_fetch.py): it serves
../shared/data's files at /<host>/<path> of their official URLs as chained_tuning/data/sources.py's table names them, ARC as a zip
built from the jsonl/csv files, SaFeRDialogues as a tar.gz of a ParlAI-format fixture (no copy of it is held);
honours Range, counts the requests, and injects a fault per path: "404", "corrupt" (one byte changed),
"truncate" (the first half, sent as if whole), ("stop", fraction, times) (the connection dropped after that
fraction of the body, the first `times` requests).

    with LoopbackMirror(DATA, tmp_dir) as m:
        subprocess.run([python, "tasks.py", "--fetch", out, "--mirror", m.url, "--no_hub"])
        m.file_requests()   # what was downloaded
"""
import gzip
import http.server
import io
import os
import sys
import tarfile
import threading
import urllib.parse
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from chained_tuning.data import fetch as fetch_data, sources  # noqa: E402

# ParlAI text format: tab-separated key:value fields, the context turns joined by an escaped newline.
SD_FIXTURE = {
    "train": 12, "valid": 4, "test": 4, "valid_bad": 2, "test_bad": 2}


def saferdialogues_lines(split, n):
    out = []
    for i in range(n):
        text = f"I never met anyone from group {i}.\\nThey are all the same, {split} #{i}.\\nThat is hurtful, please stop."
        out.append(f"text:{text}\tlabels:I am sorry, that was wrong of me ({split} {i}).\t"
                   f"original_metadata:{{'chat_id': {i}, 'recovery_id': {100 + i}}}\tepisode_done:True\n")
    return "".join(out)


def write_saferdialogues_fixture(folder):
    """DIR/saferdialogues/saferdialogues_dataset/*.txt as the release lays them out; returns the folder."""
    base = os.path.join(folder, "saferdialogues", "saferdialogues_dataset")
    os.makedirs(base, exist_ok=True)
    for split, n in SD_FIXTURE.items():
        with open(os.path.join(base, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write(saferdialogues_lines(split, n))
    return folder


def url_path(url):
    return urllib.parse.unquote(urllib.parse.urlsplit(fetch_data.source_of(url, "http://x")).path)


def build_routes(data, work):
    """{served path: bytes or file path} for every download of the table whose files are in `data`."""
    routes = {}
    for task, ds in sources.DATASETS.items():
        for dl in ds.downloads:
            if dl.archive == "zip":
                members = {f.member: _held(data, f) for f in dl.files}
                if all(members.values()):
                    buf = io.BytesIO()
                    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                        for name, path in members.items():
                            z.write(path, name)
                    routes[url_path(dl.url)] = buf.getvalue()
            elif dl.archive == "tar.gz":
                fixture = write_saferdialogues_fixture(os.path.join(work, "sd_fixture"))
                buf = io.BytesIO()
                with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as t:
                    for f in dl.files:  # mtime 0: the same archive (and sha256) on every build
                        t.add(os.path.join(fixture, f.dest), f.member, filter=_no_time)
                routes[url_path(dl.url)] = buf.getvalue()
            else:
                path = _held(data, dl.files[0])
                if path:
                    routes[url_path(dl.url)] = path
    return routes


def _no_time(info):
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def _held(data, f):
    for name in (f.dest, *f.aliases):
        if os.path.isfile(os.path.join(data, name)):
            return os.path.join(data, name)
    return None


class LoopbackMirror:
    def __init__(self, data, work):
        self.routes = build_routes(data, work)
        self.faults = {}
        self.requests = []  # (path, Range header or None, status, body bytes sent)
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                mirror._serve(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def path_of(self, url):
        return url_path(url)

    def file_requests(self):
        return [r for r in self.requests if r[2] in (200, 206)]

    def body(self, path):
        v = self.routes[path]
        if isinstance(v, bytes):
            return v
        with open(v, "rb") as f:
            return f.read()

    def _serve(self, h):
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        rng = h.headers.get("Range")
        fault = self.faults.get(path)
        if path not in self.routes or fault == "404":
            return self._send(h, path, rng, 404, b"not found")
        data = self.body(path)
        if fault == "corrupt":
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0x20]) + data[mid + 1:]
        elif fault == "truncate":
            data = data[:len(data) // 2]
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start >= len(data) > 0:
            return self._send(h, path, rng, 416, b"")
        body, status = data[start:], 206 if rng else 200
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if rng else {}
        cut = None
        if isinstance(fault, tuple) and fault[0] == "stop" and fault[2] > 0:
            self.faults[path] = ("stop", fault[1], fault[2] - 1)
            cut = int(len(data) * fault[1]) - start
        self._send(h, path, rng, status, body, headers, cut)

    def _send(self, h, path, rng, status, body, headers=None, cut=None):
        h.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            h.send_header(k, v)
        h.end_headers()
        sent = body if cut is None else body[:max(cut, 0)]
        h.wfile.write(sent)
        h.wfile.flush()
        if cut is not None:
            h.close_connection = True
        self.requests.append((path, rng, status, len(sent)))
