"""scripts/download_models.py against a local HTTP server on 127.0.0.1 that
speaks HEAD and range requests and can drop the connection mid-file."""

import http.server
import os
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, env_for
from improved_diffusion.checkpoints.published import PUBLISHED_CHECKPOINTS, checkpoint_url

from scripts import download_models


class Server:
    """Serves `files` (url path -> bytes); `cut` (path -> n) sends only n bytes
    of the next GET of that path and closes the connection."""

    def __init__(self):
        self.files, self.cut, self.requests = {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _head(self, body, start, status):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_HEAD(self):
                server.requests.append(("HEAD", self.path, None))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self._head(body, 0, 200)

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append(("GET", self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                self._head(body, start, status)
                payload = body[start:]
                n = server.cut.pop(self.path, None)
                if n is not None:
                    self.wfile.write(payload[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, name, data):
        path = checkpoint_url(name, "")  # "/jul-2021/NAME.pt"
        self.files[path] = data
        return path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def blob(n, seed=0):
    return bytes((i * 7 + seed) % 251 for i in range(n))


def test_download_and_already_there(server, tmp_path, capsys):
    data = blob(3 * download_models.CHUNK + 123)
    server.add("lsun_cat", data)
    assert download_models.main(["lsun_cat", "--models_dir", str(tmp_path), "--base_url", server.url]) == 0
    assert (tmp_path / "lsun_cat.pt").read_bytes() == data
    assert not (tmp_path / "lsun_cat.pt.part").exists()
    assert ("GET", "/jul-2021/lsun_cat.pt", None) in server.requests
    assert download_models.main(["lsun_cat.pt", "--models_dir", str(tmp_path), "--base_url", server.url]) == 0
    assert "already there" in capsys.readouterr().out
    assert sum(r[0] == "GET" for r in server.requests) == 1


def test_interrupted_download_resumes(server, tmp_path, capsys):
    data = blob(2 * download_models.CHUNK + 5000, seed=3)
    path = server.add("cifar10_uncond_50M_500K", data)
    server.cut[path] = 1_000_000
    args = ["cifar10_uncond_50M_500K", "--models_dir", str(tmp_path), "--base_url", server.url]
    assert download_models.main(args) == 1
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == (f"error: cifar10_uncond_50M_500K: the download stopped at 1000000 of {len(data)} bytes "
                   f"(kept in {tmp_path}/cifar10_uncond_50M_500K.pt.part); run the same command again to resume")
    assert not (tmp_path / "cifar10_uncond_50M_500K.pt").exists()  # never a partial file under the final name
    assert (tmp_path / "cifar10_uncond_50M_500K.pt.part").stat().st_size == 1_000_000
    assert download_models.main(args) == 0
    assert (tmp_path / "cifar10_uncond_50M_500K.pt").read_bytes() == data
    assert server.requests[-1] == ("GET", "/march-2021/cifar10_uncond_50M_500K.pt", "bytes=1000000-")


def test_partial_file_already_complete_and_size_mismatch(server, tmp_path, capsys):
    data = blob(1000)
    server.add("lsun_horse", data)
    (tmp_path / "lsun_horse.pt.part").write_bytes(data)
    args = ["lsun_horse", "--models_dir", str(tmp_path), "--base_url", server.url]
    assert download_models.main(args) == 0
    assert (tmp_path / "lsun_horse.pt").read_bytes() == data
    (tmp_path / "lsun_horse.pt").write_bytes(data[:10])  # a file of the wrong size is not overwritten
    assert download_models.main(args) == 1
    assert "has 10 bytes but" in capsys.readouterr().err
    # A partial file longer than the real one is discarded.
    (tmp_path / "lsun_horse.pt").unlink()
    (tmp_path / "lsun_horse.pt.part").write_bytes(data + b"junk")
    assert download_models.main(args) == 0
    assert (tmp_path / "lsun_horse.pt").read_bytes() == data


def test_errors(server, tmp_path, capsys):
    args = ["--models_dir", str(tmp_path), "--base_url", server.url]
    assert download_models.main(["nope"] + args) == 2
    assert capsys.readouterr().err.strip() == "error: unknown checkpoint nope; --list shows the published names"
    assert download_models.main(args) == 2
    assert download_models.main(["lsun_bedroom"] + args) == 1  # not on this server
    assert "was not found (HTTP 404)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_all_and_list_from_the_command_line(server, tmp_path):
    for i, name in enumerate(PUBLISHED_CHECKPOINTS):
        server.add(name, blob(100 + i, seed=i))
    env = env_for(IMPROVED_DIFFUSION_MODELS_URL=server.url)
    script = os.path.join(ROOT, "scripts", "download_models.py")
    res = subprocess.run([sys.executable, script, "--all", "--models_dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(f"{n}.pt" for n in PUBLISHED_CHECKPOINTS)
    assert len(PUBLISHED_CHECKPOINTS) == 23
    res = subprocess.run([sys.executable, script, "--list"], capture_output=True, text=True, timeout=60)
    assert "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/128x128_classifier.pt" in res.stdout
    assert "https://openaipublic.blob.core.windows.net/diffusion/march-2021/upsample_cond_500K.pt" in res.stdout
