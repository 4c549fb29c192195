"""edge-run serve: the JSON API on real bundles, bad input, limits, token, reload, and a real uvicorn
under a full queue, slow models and a reload in flight."""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
import httpx
from starlette.testclient import TestClient

import edgerun
from edgerun.errors import BundleError, InputError
from edgerun.runtime import index as ix
from edgerun.runtime.model import Caption
from edgerun.runtime.server.app import create_app
from edgerun.runtime.server.config import ServerConfig
from edgerun.runtime.server.imagesize import image_size

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def encode(rgb: np.ndarray, ext: str = ".png") -> bytes:
    return cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()


def photo(colour, size=48) -> np.ndarray:
    """A solid colour with a grey square, so captions of different colours differ."""
    image = np.full((size, size, 3), COLOURS[colour], np.uint8)
    image[size // 3:size // 2, size // 3:size // 2] = 128
    return image


def upload(data: bytes, name="photo.png", kind="image/png"):
    return {"image": (name, data, kind)}


class FakeModel:
    """The caption/answer surface of edgerun.Model: answers after `delay` s, or when `gate` opens,
    with a label naming which load made it."""

    def __init__(self, label="one", delay=0.0, gate: threading.Event | None = None, tasks=("caption", "vqa")):
        self.label, self.delay, self.gate, self.tasks, self.identity = label, delay, gate, tasks, {}
        self.calls = 0

    def caption(self, image, **options):
        self.calls += 1
        if self.gate is not None and self.calls > 1:  # the load-time probe is the first call
            self.gate.wait(10)
        time.sleep(self.delay)
        return Caption(f"{self.label} {image.shape[1]}x{image.shape[0]}", [101, 7, 102], -1.5)

    def answer(self, image, question, **options):
        return Caption(f"{self.label}: {question}", [1], -0.5)


def fake_app(config=None, **model_args):
    return create_app(["/nowhere/fake-bundle"], config, loader=lambda path: FakeModel(**model_args))


# -- the API on real bundles -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    for colour in COLOURS:
        (root / f"{colour}.png").write_bytes(encode(photo(colour, 200)))
    return root


@pytest.fixture(scope="module")
def zoo_index(zoo_export, gallery, tmp_path_factory):
    _, report, model = zoo_export
    out = tmp_path_factory.mktemp("index") / "gallery"
    ix.build_index(model, [gallery], output=out, thumbnails=64)
    return report.path, out


@pytest.fixture(scope="module")
def real_client(blip_bundle, vqa_bundle, zoo_index):
    retrieval, index = zoo_index
    app = create_app([blip_bundle, vqa_bundle, retrieval], ServerConfig(threads=1), index=index)
    with TestClient(app) as client:
        yield client


def test_caption_matches_the_python_api(real_client, blip_bundle):
    image = photo("red")
    want = edgerun.load(blip_bundle, threads=1).caption(image, num_beams=2, max_new_tokens=6)
    r = real_client.post("/v1/caption", files=upload(encode(image)), data={"num_beams": "2", "max_new_tokens": "6"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["text"], body["token_ids"]) == (want.text, want.token_ids)
    assert body["score"] == pytest.approx(want.score, abs=1e-5)
    assert body["bundle"] == Path(blip_bundle).name and body["alternatives"] == []
    two = real_client.post("/v1/caption", json={"image": base64.b64encode(encode(image)).decode(), "num_beams": 2,
                                                "num_return_sequences": 2, "max_new_tokens": 6}).json()
    assert two["text"] == want.text and len(two["alternatives"]) == 1


def test_vqa_matches_the_python_api_and_needs_a_question(real_client, vqa_bundle):
    image = photo("blue")
    want = edgerun.load(vqa_bundle, threads=1).answer(image, "what colour is it?", max_new_tokens=4)
    data = "data:image/jpeg;base64," + base64.b64encode(encode(image)).decode()
    r = real_client.post("/v1/vqa", json={"image": data, "question": "what colour is it?", "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    assert (r.json()["text"], r.json()["token_ids"]) == (want.text, want.token_ids)
    r = real_client.post("/v1/vqa", files=upload(encode(image)))
    assert r.status_code == 400 and "field 'question' is required" in r.json()["error"]


def test_search_by_text_and_image_returns_index_thumbnails(real_client, zoo_index):
    index = ix.open_index(zoo_index[1])
    r = real_client.post("/v1/search", json={"text": "a red square", "k": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [h["rank"] for h in results] == [1, 2] and results[0]["score"] >= results[1]["score"]
    for hit in results:
        jpeg = base64.b64decode(hit["thumbnail"].removeprefix("data:image/jpeg;base64,"))
        assert jpeg == index.thumbnail(hit["id"]) and hit["name"] == Path(index.items[hit["id"]]).name
        assert max(cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1).shape[:2]) == 64  # 200 px photos, 64 px thumbs
    r = real_client.post("/v1/search", files=upload(encode(photo("green", 200))), data={"k": "1"})
    assert r.json()["results"][0]["name"] == "green.png"
    r = real_client.post("/v1/search", files=upload(encode(photo("green"))), data={"text": "green"})
    assert r.status_code == 400 and "not both" in r.json()["error"]


def test_models_and_health_describe_the_routes(real_client, blip_bundle, vqa_bundle, zoo_index):
    info = real_client.get("/v1/models").json()
    assert info["routes"] == {"caption": Path(blip_bundle).name, "vqa": Path(vqa_bundle).name,
                              "retrieval": Path(zoo_index[0]).name}
    assert info["index"] == {"name": "gallery", "count": 3, "thumbnails": True}
    assert info["limits"]["max_pixels"] == ServerConfig().max_pixels
    health = real_client.get("/v1/health").json()
    assert health["status"] == "ok" and health["tasks"] == ["caption", "retrieval", "vqa"]


def test_bad_decoding_options_are_400_with_the_reason(real_client):
    r = real_client.post("/v1/caption", files=upload(encode(photo("red"))), data={"num_beams": "0"})
    assert r.status_code == 400 and "num_beams must be >= 1" in r.json()["error"]
    r = real_client.post("/v1/caption", files=upload(encode(photo("red"))), data={"num_beams": "two"})
    assert r.status_code == 400 and "field 'num_beams' must be an integer" in r.json()["error"]
    r = real_client.post("/v1/caption", files=upload(encode(photo("red"))), data={"num_beams": "9"})
    assert r.status_code == 400 and "at most 8" in r.json()["error"]


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture
def client():
    with TestClient(fake_app(ServerConfig(max_upload_bytes=200_000, max_pixels=100_000))) as c:
        yield c


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header saying width x height, with a few bytes of (all-zero) image data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_unknown_fields_wrong_types_and_missing_image_are_400(client):
    png = encode(photo("red"))
    r = client.post("/v1/caption", files=upload(png), data={"beams": "2"})
    assert r.status_code == 400 and "unknown field(s) 'beams'" in r.json()["error"] and "num_beams" in r.json()["error"]
    r = client.post("/v1/vqa", json={"image": base64.b64encode(png).decode(), "question": "q", "colour": 1})
    assert r.status_code == 400 and "'colour'" in r.json()["error"]
    assert client.post("/v1/caption", json={"num_beams": 2}).json()["error"] == "field 'image' is required for /v1/caption"
    r = client.post("/v1/caption", json={"image": "@@not base64@@"})
    assert r.status_code == 400 and "not valid base64" in r.json()["error"]
    r = client.post("/v1/caption", json={"image": base64.b64encode(png).decode(), "max_new_tokens": "5"})
    assert r.status_code == 400 and "must be an integer" in r.json()["error"]
    assert client.post("/v1/caption", content=b"[1, 2]", headers={"content-type": "application/json"}).status_code == 400
    r = client.post("/v1/caption", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/v1/caption", files=upload(png), data={"image": "x"})
    assert r.status_code == 400 and "more than once" in r.json()["error"]


def test_non_images_and_wrong_content_types_are_415(client):
    r = client.post("/v1/caption", files=upload(b"just some text", "notes.txt", "text/plain"))
    assert r.status_code == 415 and "not a supported image file" in r.json()["error"]
    r = client.post("/v1/caption", content=encode(photo("red")), headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]


def test_truncated_uploads_are_400_and_the_server_keeps_serving(client):
    jpeg = encode(photo("red"), ".jpg")
    r = client.post("/v1/caption", files=upload(jpeg[: len(jpeg) // 2], "cut.jpg", "image/jpeg"))
    assert r.status_code == 400 and "truncated" in r.json()["error"]
    r = client.post("/v1/caption", files=upload(jpeg[:4], "stub.jpg", "image/jpeg"))
    assert r.status_code == 400 and "header could not be read" in r.json()["error"]
    multipart = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG'
    r = client.post("/v1/caption", content=multipart, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400
    assert client.post("/v1/caption", files=upload(jpeg, "ok.jpg", "image/jpeg")).json()["text"] == "one 48x48"


def test_big_bodies_and_decompression_bombs_are_413_before_decoding(client, monkeypatch):
    r = client.post("/v1/caption", files=upload(b"\x89PNG" + bytes(300_000)))
    assert r.status_code == 413 and "limit is 200000 bytes" in r.json()["error"]
    decoded = []
    monkeypatch.setattr("edgerun.runtime.server.app.decode_image", lambda *a, **k: decoded.append(1))
    bomb = png_claiming(50_000, 50_000)
    assert image_size(bomb) == (50_000, 50_000) and len(bomb) < 200
    r = client.post("/v1/caption", files=upload(bomb))
    assert r.status_code == 413 and "2500000000 pixels; the limit is 100000" in r.json()["error"]
    r = client.post("/v1/caption", files=upload(encode(np.zeros((400, 300, 3), np.uint8), ".jpg"), "big.jpg"))
    assert r.status_code == 413 and "300x400" in r.json()["error"]
    assert decoded == []


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tiff"])
def test_image_size_reads_every_supported_header(ext):
    assert image_size(encode(np.zeros((37, 53, 3), np.uint8), ext)) == (53, 37)


def test_token_is_required_on_the_api_but_not_for_health():
    with TestClient(fake_app(ServerConfig(token="s3cret-token"))) as c:
        png = encode(photo("red"))
        r = c.post("/v1/caption", files=upload(png))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/caption", files=upload(png), headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        ok = c.post("/v1/caption", files=upload(png), headers={"authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and c.get("/v1/health").status_code == 200


def test_the_page_is_offline_and_strict():
    with TestClient(fake_app()) as c:
        page = c.get("/")
        assert page.status_code == 200 and "csp" not in page.text.lower()
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in ("/", "/static/app.js", "/static/style.css"):
            text = c.get(asset).text
            assert "http://" not in text and "https://" not in text and "//cdn" not in text, asset
        assert "getUserMedia" in c.get("/static/app.js").text
        r = c.post("/v1/search", json={"text": "x"})
        assert r.status_code == 404 and "serves: caption, vqa" in r.json()["error"]


# -- starting, failing to start, reloading -----------------------------------------------------------


def test_a_bundle_that_fails_to_load_stops_the_start_with_the_reason(tmp_path, blip_bundle):
    with pytest.raises(BundleError, match=f"bundle {tmp_path / 'missing'} could not be loaded"):
        create_app([blip_bundle, tmp_path / "missing"])

    def broken(path):
        model = FakeModel()
        model.caption = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("ORT: bad graph"))
        return model

    with pytest.raises(BundleError, match="failed its first run: RuntimeError: ORT: bad graph"):
        create_app(["/b"], loader=broken)
    with pytest.raises(BundleError, match="it serves bench; the server runs caption, vqa, retrieval"):
        create_app(["/b"], loader=lambda p: FakeModel(tasks=("bench",)))
    with pytest.raises(InputError, match="needs a retrieval bundle"):
        create_app(["/b"], index=tmp_path, loader=lambda p: FakeModel())


def test_cli_refuses_to_start_on_a_bad_bundle(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgerun.cli", "serve", str(tmp_path / "nope"), "--port", "9"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: bundle {tmp_path / 'nope'} could not be loaded")


def test_reload_swaps_the_bundles_and_a_failed_reload_keeps_the_old_ones():
    loads, fail = [], []

    def loader(path):
        if fail:
            raise BundleError("manifest.json is damaged")
        loads.append(path)
        return FakeModel(label=f"gen{len(loads)}")

    with TestClient(create_app(["/b"], loader=loader)) as c:
        png = encode(photo("red"))
        assert c.post("/v1/caption", files=upload(png)).json()["text"].startswith("gen1")
        assert c.post("/v1/reload").json()["generation"] == 2
        assert c.post("/v1/caption", files=upload(png)).json()["text"].startswith("gen2")
        fail.append(True)
        r = c.post("/v1/reload")
        assert r.status_code == 500 and "still serving generation 2: bundle /b could not be loaded" in r.json()["error"]
        assert c.post("/v1/caption", files=upload(png)).json()["text"].startswith("gen2")


# -- a real uvicorn --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def post_async(url, results, key, **kwargs):
    thread = threading.Thread(target=lambda: results.__setitem__(key, httpx.post(url, timeout=30, **kwargs)))
    thread.start()
    return thread


def wait_for(condition, within=10.0):
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_full_queue_answers_503_at_once_and_slow_requests_504():
    gate = threading.Event()
    app = fake_app(ServerConfig(workers=1, queue_size=1, timeout_s=1.0), gate=gate)
    png, results = encode(photo("red")), {}
    with Served(app) as srv:
        threads = [post_async(f"{srv.url}/v1/caption", results, "running", files=upload(png))]
        wait_for(lambda: httpx.get(f"{srv.url}/v1/health").json()["pending"] == 1)
        threads.append(post_async(f"{srv.url}/v1/caption", results, "queued", files=upload(png)))
        wait_for(lambda: httpx.get(f"{srv.url}/v1/health").json()["pending"] == 2)
        start = time.monotonic()
        busy = httpx.post(f"{srv.url}/v1/caption", files=upload(png), timeout=30)
        assert busy.status_code == 503 and time.monotonic() - start < 0.5
        assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["error"]
        for thread in threads:
            thread.join(30)
        assert [results[k].status_code for k in ("running", "queued")] == [504, 504]
        assert "longer than 1 s" in results["queued"].json()["error"]
        gate.set()  # the running job ends; the queued one was cancelled, never run
        wait_for(lambda: httpx.get(f"{srv.url}/v1/health").json()["pending"] == 0)
        assert app.server.models.bundles[0].model.calls == 2  # the probe and the one that ran
        assert httpx.post(f"{srv.url}/v1/caption", files=upload(png), timeout=30).status_code == 200


def test_reload_under_load_drops_no_request_in_flight():
    labels = iter(f"gen{i}" for i in range(1, 10))
    app = create_app(["/b"], ServerConfig(workers=2, queue_size=8), loader=lambda p: FakeModel(next(labels), 0.3))
    png, results = encode(photo("red")), {}
    with Served(app) as srv:
        threads = [post_async(f"{srv.url}/v1/caption", results, i, files=upload(png)) for i in range(4)]
        wait_for(lambda: httpx.get(f"{srv.url}/v1/health").json()["pending"] >= 2)
        reload = httpx.post(f"{srv.url}/v1/reload", timeout=30)
        assert reload.status_code == 200 and reload.json()["generation"] == 2
        for thread in threads:
            thread.join(30)
        assert [results[i].status_code for i in range(4)] == [200] * 4
        assert all(results[i].json()["text"].startswith("gen1") for i in range(4))
        after = httpx.post(f"{srv.url}/v1/caption", files=upload(png), timeout=30).json()
        assert after["text"].startswith("gen2") and after["generation"] == 2


@pytest.mark.slow
def test_cli_serves_and_reloads_on_sighup(blip_bundle):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "edgerun.cli", "serve", str(blip_bundle), "--port", str(port),
                               "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def up():
            assert server.poll() is None, server.stderr.read()
            try:
                return httpx.get(f"{url}/v1/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, within=120)
        assert httpx.get(f"{url}/v1/health").json()["generation"] == 1
        r = httpx.post(f"{url}/v1/caption", files=upload(encode(photo("red"))), timeout=30)
        assert r.status_code == 200 and r.json()["text"] == edgerun.load(blip_bundle).caption(photo("red")).text
        server.send_signal(signal.SIGHUP)
        wait_for(lambda: httpx.get(f"{url}/v1/health").json()["generation"] == 2, within=60)
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(30)


# -- the load script, short ------------------------------------------------------------------------


def load_script():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("serve_load", module)  # dataclasses look their module up while it loads
    spec.loader.exec_module(sys.modules["serve_load"])
    return sys.modules["serve_load"]


def test_short_load_serves_with_only_503s_and_no_other_errors(blip_bundle):
    serve_load = load_script()
    app = create_app([blip_bundle], ServerConfig(workers=1, queue_size=2, timeout_s=20, threads=1))
    with Served(app) as srv:
        result = asyncio.run(serve_load.run_load(srv.url, serve_load.sample_image(), clients=8, seconds=3.0))
    assert result.served > 0 and result.other_errors == {} and result.timeout_504 == 0
    assert result.busy_503 > 0  # 8 clients against room for 3: the rest are turned away, not queued
    assert result.p50_ms is not None and result.p50_ms <= result.p99_ms


# -- thumbnails in the index -------------------------------------------------------------------------


class ColourModel:
    """The retrieval surface of edgerun.Model: an image embeds as its mean colour."""

    def __init__(self):
        self.bundle = type("B", (), {"path": Path("/bundles/colour")})()
        self.identity = {"source": "colour", "architecture": "mean", "weights_sha256": "00"}

    def embed_images(self, images):
        from edgerun.runtime.image import load_image

        return np.stack([load_image(i).reshape(-1, 3).mean(0) + 1 for i in images]).astype(np.float32)


def test_index_thumbnails_are_made_at_index_time_and_kept_on_add(tmp_path, gallery):
    out = tmp_path / "idx"
    ix.build_index(ColourModel(), [gallery / "red.png"], output=out, thumbnails=32)
    index = ix.open_index(out)
    thumb = cv2.imdecode(np.frombuffer(index.thumbnail(0), np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape == (32, 32, 3) and abs(int(thumb[2, 2, 2]) - COLOURS["red"][0]) < 8  # BGR: red last
    ix.build_index(ColourModel(), [gallery], output=out, add=True)  # no thumbnails= : the index's own size
    index = ix.open_index(out)
    assert len(index) == 3 and index.meta.thumb_size == 32 and all(index.thumbnail(i) for i in range(3))
    assert sorted(p.name.split("-")[0] for p in out.iterdir()) == ["index.json", "items", "thumbs", "vectors"]
    plain = tmp_path / "plain"
    ix.build_index(ColourModel(), [gallery / "red.png"], output=plain)
    assert not ix.open_index(plain).has_thumbnails and ix.open_index(plain).thumbnail(0) is None
    ix.build_index(ColourModel(), [gallery], output=plain, add=True, thumbnails=48)  # the old row gets one too
    assert all(ix.open_index(plain).thumbnail(i) for i in range(3))
    with pytest.raises(InputError, match="row 3 is not in index"):
        ix.open_index(plain).thumbnail(3)


def test_damaged_thumbnail_places_are_refused(tmp_path, gallery):
    ix.build_index(ColourModel(), [gallery], output=tmp_path / "idx", thumbnails=32)
    items = next((tmp_path / "idx").glob("items-*.jsonl"))
    items.write_text(items.read_text().replace('"thumb": [0, ', '"thumb": [99999, ', 1))
    meta_file = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_file.read_text())
    meta["sizes"][items.name] = items.stat().st_size
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ix.IndexFileError, match="damaged.*thumbnail place"):
        ix.open_index(tmp_path / "idx")


def test_cli_index_makes_thumbnails_by_default(tmp_path, gallery, monkeypatch):
    from click.testing import CliRunner

    from edgerun import cli_index
    from edgerun.cli import cli

    monkeypatch.setattr(cli_index, "load_model", lambda bundle: ColourModel())
    out = CliRunner().invoke(cli, ["index", "bundle", str(gallery), "-o", str(tmp_path / "idx")])
    assert out.exit_code == 0, out.output
    assert ix.open_index(tmp_path / "idx").meta.thumb_size == 160
    out = CliRunner().invoke(cli, ["index", "b", str(gallery), "-o", str(tmp_path / "no"), "--thumbnails", "0"])
    assert out.exit_code == 0 and not ix.open_index(tmp_path / "no").has_thumbnails


def test_the_server_imports_no_torch(blip_bundle):
    code = ("import sys\nfrom starlette.testclient import TestClient\n"
            "from edgerun.runtime.server.app import create_app\n"
            f"with TestClient(create_app([{str(blip_bundle)!r}])) as c:\n"
            "    r = c.post('/v1/caption', json={'image': sys.argv[1]})\n"
            "print(r.status_code, 'torch' in sys.modules)\n")
    image = base64.b64encode(encode(photo("red"))).decode()
    r = subprocess.run([sys.executable, "-c", code, image], capture_output=True, text=True, timeout=120, check=False)
    assert r.stdout.split() == ["200", "False"], r.stderr
