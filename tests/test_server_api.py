"""The HTTP API against a real `infinitetalk serve --model tiny` on 127.0.0.1 (API key, 1 MiB upload
limit, an allowed folder): submit, poll, SSE, download with ranges (PyAV check), cancel, bad uploads
store nothing, problem details, webhooks signed and retried, status requests per second."""
from __future__ import annotations

import hashlib
import hmac
import base64
import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import httpx
import pytest

pytest.importorskip("fastapi")

from server_support import TINY, WINDOWS, Server, ended, record, short_wav, small_image, submit, wait_for  # noqa: E402

KEY = "test-key-" + "x" * 24


# upload limits of the test server (small, so that files over them stay under the 1 MiB byte limit)
MAX_AUDIO_SECONDS, MAX_IMAGE_PIXELS, MAX_VIDEO_FRAMES = 3, 200 * 200, 30


@pytest.fixture(scope="module")
def env(tmp_path_factory, media_dir):
    root = tmp_path_factory.mktemp("api")
    allowed = root / "allowed"
    allowed.mkdir()
    weights = root / "weights"  # empty: Kokoro-82M is put there by the speech-from-text test
    weights.mkdir()
    media = {"image": small_image(root, media_dir), "audio": short_wav(root, media_dir, 1.0),
             "tiny_audio": short_wav(root, media_dir, 0.2)}
    (allowed / "face.png").write_bytes(media["image"].read_bytes())
    (allowed / "speech.wav").write_bytes(media["tiny_audio"].read_bytes())
    keys = root / "keys.txt"
    keys.write_text(f"# test key\n{KEY}\n")
    with pytest.MonkeyPatch.context() as mp:  # the server process keeps its synthesised speech in the tmp dir
        mp.setenv("INFINITETALK_SPEECH_CACHE", str(root / "speech_cache"))
        server = Server(root / "data", "--api-key-file", str(keys), "--max-upload-mb", "1", "--allow-dir",
                        str(allowed), "--weights", str(weights), "--max-audio-seconds", str(MAX_AUDIO_SECONDS),
                        "--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-video-frames", str(MAX_VIDEO_FRAMES),
                        key=KEY).start()
    yield {"server": server, "root": root, "allowed": allowed, "weights": weights, "media_dir": media_dir,
           "base": tmp_path_factory.getbasetemp(), **media}
    server.stop()


def problem(answer: httpx.Response, status: int) -> dict:
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["content-type"].startswith("application/problem+json"), answer.headers
    body = answer.json()
    assert body["status"] == status and body["title"] and "Traceback" not in answer.text
    detail = body["detail"]
    assert detail.endswith(".") and "\n" not in detail and detail.count(". ") == 0, detail
    return body


def stored(env) -> tuple[int, list[str]]:
    with env["server"].client() as c:
        total = sum(len(c.get("/v1/jobs", params={"state": s, "limit": 100}).json()["jobs"])
                    for s in ("queued", "running", "succeeded", "failed", "cancelled"))
    data = env["server"].data
    return total, sorted(p.name for p in (data / "jobs").iterdir()) + sorted(p.name for p in (data / "staging").iterdir())


def test_docs_health_and_keys(env):
    s = env["server"]
    assert httpx.get(s.url + "/v1/health").json() == {"status": "ok"}
    schema = httpx.get(s.url + "/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/video"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert "swagger" in httpx.get(s.url + "/docs").text.lower()
    problem(httpx.get(s.url + "/v1/jobs"), 401)
    problem(httpx.get(s.url + "/v1/jobs", headers={"authorization": "Bearer " + KEY[:-1] + "y"}), 401)
    problem(httpx.get(s.url + "/metrics"), 401)
    with s.client() as c:
        problem(c.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd"), 404)
        problem(c.get("/v1/jobs/job_" + "a" * 22), 404)
        problem(c.get("/v1/nothing"), 404)
        problem(c.get("/v1/jobs", params={"state": "lost"}), 422)


def test_serve_refuses_public_host_without_keys(capsys):
    from infinitetalk.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "127.0.0.1 only" in err and "--api-key-file" in err and "Traceback" not in err


def test_gpus_and_key_file_are_checked(tmp_path):
    import torch

    from infinitetalk.errors import InputError
    from infinitetalk.server.config import parse_devices, read_api_keys
    from infinitetalk.server.security import key_matches

    assert parse_devices("none") == () and parse_devices("cpu") == ("cpu",)
    if not torch.cuda.is_available():
        assert parse_devices("all") == ("cpu",)
        with pytest.raises(InputError, match="no GPU 0"):
            parse_devices("0")
    with pytest.raises(InputError, match="GPU numbers"):
        parse_devices("zero")
    short = tmp_path / "k.txt"
    short.write_text("abc\n")
    with pytest.raises(InputError, match="shorter than 16"):
        read_api_keys(str(short))
    assert key_matches(KEY, ("another-key-0123456789", KEY)) and not key_matches(KEY + "x", (KEY,))


@pytest.mark.slow  # includes the first job's model load
def test_submit_poll_sse_download_delete(env):
    s = env["server"]
    with s.client() as c:
        job = submit(c, env["image"], env["tiny_audio"], {**TINY, "seed": 3})
        assert job["state"] == "queued" and job["id"].startswith("job_") and len(job["id"]) == 26
        events = []
        with c.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=httpx.Timeout(240.0)) as stream:
            name = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and name:
                    events.append((name, json.loads(line.split(":", 1)[1])))
                    if name == "end":
                        break
        states = [d["state"] for n, d in events if n == "job"]
        assert events[-1] == ("end", {"id": job["id"], "state": "succeeded"}), events[-3:]
        assert states[-1] == "succeeded" and "running" in states, states
        done = c.get(f"/v1/jobs/{job['id']}").json()
        assert done["progress"]["windows_done"] == done["progress"]["windows"] == 1
        assert done["result"]["frames"] == 5 and done["first_window_s"] > 0
        record(env["base"], "submit_to_first_window_s_cold", round(done["first_window_s"], 3))

        video = c.get(done["result"]["url"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        path = env["root"] / "got.mp4"
        path.write_bytes(video.content)
        with av.open(str(path)) as mp4:
            assert mp4.streams.video[0].average_rate == 25 and mp4.streams.audio
            frames = [f.to_ndarray(format="rgb24") for f in mp4.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape[0] == 128 and frames[0].std() > 1
        part = c.get(done["result"]["url"], headers={"range": "bytes=100-299"})
        assert part.status_code == 206 and part.content == video.content[100:300]
        assert part.headers["content-range"] == f"bytes 100-299/{len(video.content)}"
        beyond = c.get(done["result"]["url"], headers={"range": f"bytes={len(video.content) + 10}-"})
        assert beyond.status_code == 416

        listed = c.get("/v1/jobs", params={"state": "succeeded", "limit": 100}).json()["jobs"]
        assert job["id"] in [j["id"] for j in listed]
        metrics = c.get("/metrics").text
        assert 'infinitetalk_jobs{state="succeeded"}' in metrics and "infinitetalk_queue_length" in metrics
        assert "infinitetalk_window_seconds_count" in metrics and "infinitetalk_model_loads_total 1.0" in metrics

        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
        problem(c.get(f"/v1/jobs/{job['id']}"), 404)
        assert not (s.data / "jobs" / job["id"]).exists()


def test_cancel_running_job(env):
    with env["server"].client() as c:
        job = submit(c, env["image"], env["audio"], WINDOWS)  # 1 s of speech: 6 windows
        wait_for(c, job["id"], lambda j: j["state"] == "running" and j["progress"]["stage"] == "sample" or ended(j))
        answer = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert answer.status_code == 202 and answer.json()["cancel_requested"]
        done = wait_for(c, job["id"], ended, timeout=120)
        assert done["state"] == "cancelled", done
        assert done["error"]["type"] == "JobCancelledError" and done["error"]["detail"].endswith(".")
        assert done["progress"]["windows_done"] < 6
        problem(c.post(f"/v1/jobs/{job['id']}/cancel"), 409)
        problem(c.get(f"/v1/jobs/{job['id']}/video"), 409)


def _raw_truncated_request(server: Server, image: bytes) -> None:
    """A multipart request whose body stops half way (Content-Length promises more), then the socket closes."""
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"f.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.3)
    time.sleep(0.5)


def test_bad_uploads_store_nothing(env):
    s = env["server"]
    before = stored(env)
    png = env["image"].read_bytes()
    wav = env["tiny_audio"].read_bytes()
    with s.client() as c:
        def post(files, settings=None, **data):
            if settings is not None:
                data["settings"] = json.dumps(settings)
            return c.post("/v1/jobs", files=files, data=data)

        b = problem(post({"image": ("face.png", b"this is text, not a picture\n" * 10, "image/png"),
                          "audio": ("a.wav", wav, "audio/wav")}), 415)
        assert "image" in b["detail"]
        problem(post({"image": ("face.png", png, "image/png"), "audio": ("a.wav", png, "audio/wav")}), 415)
        big = b"\x89PNG\r\n\x1a\n" + bytes(2 * 2**20)
        problem(post({"image": ("face.png", big, "image/png"), "audio": ("a.wav", wav, "audio/wav")}), 413)
        problem(post({"image": ("face.png", png[: len(png) // 2], "image/png"), "audio": ("a.wav", wav, "audio/wav")}),
                422)
        problem(post({"image": ("face.png", png, "image/png"), "audio": ("a.wav", wav[:30], "audio/wav")}), 422)
        problem(post({"image": ("face.png", png, "image/png"), "notes": ("n.txt", b"hi", "text/plain")}), 422)
        problem(post({"image": ("face.png", png, "image/png"), "audio": ("a.wav", wav, "audio/wav")},
                     {"steps": "many"}), 422)
        problem(post({"image": ("face.png", png, "image/png"), "audio": ("a.wav", wav, "audio/wav")},
                     {"stepz": 3}), 422)
        problem(post({"image": ("face.png", png, "image/png"), "audio": ("a.wav", wav, "audio/wav")},
                     {"output": "/etc/passwd"}), 422)
        problem(post({"audio": ("a.wav", wav, "audio/wav")}, {"image": "../../../etc/passwd"}), 403)
        problem(post({"audio": ("a.wav", wav, "audio/wav")}, {"image": "/etc/hostname"}), 403)
        problem(c.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}), 415)
        problem(c.post("/v1/jobs", json={"settings": {**TINY, "image": "face.png"}}), 422)  # no audio
        _raw_truncated_request(s, png)
        assert stored(env) == before, "a refused upload left something behind"

        ok = c.post("/v1/jobs", json={"settings": {**TINY, "image": "face.png", "audio": "speech.wav"}})
        assert ok.status_code == 201, ok.text
        assert ok.json()["settings"]["image"] == str(env["allowed"] / "face.png")
        wait_for(c, ok.json()["id"], ended)


class _Receiver(BaseHTTPRequestHandler):
    """A webhook receiver that records every call; the first answer is a 500 when `fail_first`."""

    calls: list = []
    fail_first = True

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        self.calls.append((dict(self.headers.items()), body))
        self.send_response(500 if self.fail_first and len(self.calls) == 1 else 204)
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _receiving(handler):
    """A webhook receiver (`handler`, its calls cleared) on a loopback port: yields its URL."""
    handler.calls = []
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    finally:
        receiver.shutdown()


@pytest.mark.slow
def test_webhook_signed_and_retried_after_500(env):
    from standardwebhooks.webhooks import Webhook

    with _receiving(_Receiver) as url, env["server"].client() as c:
        job = submit(c, env["image"], env["tiny_audio"], TINY, webhook_url=url)
        wait_for(c, job["id"], ended)
        deadline = time.monotonic() + 60
        while len(_Receiver.calls) < 2:
            assert time.monotonic() < deadline, f"{len(_Receiver.calls)} webhook call(s) in 60 s"
            time.sleep(0.1)
        time.sleep(0.5)
        log = c.get(f"/v1/jobs/{job['id']}/webhooks").json()["deliveries"]
    secret = (env["server"].data / "webhook_secret").read_text().strip()
    ids = set()
    for headers, body in _Receiver.calls:
        headers = {k.lower(): v for k, v in headers.items()}
        Webhook(secret).verify(body, headers)  # the reference implementation accepts it
        mine = base64.b64encode(hmac.new(base64.b64decode(secret[6:]),
                                         f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
        assert headers["webhook-signature"] == "v1," + mine
        payload = json.loads(body)
        assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
        ids.add(headers["webhook-id"])
    with pytest.raises(Exception):
        Webhook(secret).verify(body.replace(b"succeeded", b"failed"), headers)
    assert len(_Receiver.calls) == 2 and len(ids) == 1, "a retry must keep the message id"
    assert len(log) == 1 and log[0]["state"] == "delivered" and log[0]["attempts"] == 2 and log[0]["last_status"] == 204


def test_status_requests_per_second(env):
    with env["server"].client() as c:
        page = c.get("/v1/jobs", params={"limit": 1}).json()
        job_id = page["jobs"][0]["id"]
        if page["next_cursor"]:  # the next page starts after the first: an older job
            older = c.get("/v1/jobs", params={"limit": 1, "cursor": page["next_cursor"]}).json()["jobs"]
            assert older and older[0]["id"] != job_id and older[0]["created_at"] <= page["jobs"][0]["created_at"]

    def hammer(_):
        n, end = 0, time.monotonic() + 2.0
        with env["server"].client() as c:
            while time.monotonic() < end:
                assert c.get(f"/v1/jobs/{job_id}").status_code == 200
                n += 1
        return n

    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(hammer, range(4)))
    rps = total / 2.0
    record(env["base"], "status_rps_idle_4_clients", round(rps, 1))
    assert rps > 20


def _tiny_video(path, frames: int):
    """An MP4 of `frames` 64x64 frames (a few KB)."""
    import numpy as np

    with av.open(str(path), "w") as c:
        stream = c.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), (i * 5) % 255, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return path


def test_uploads_over_the_limits_give_413_and_store_nothing(env):
    from PIL import Image

    root = env["root"]
    long_wav = short_wav(root, env["media_dir"], MAX_AUDIO_SECONDS + 1.0)
    big_png = root / "big.png"
    Image.new("RGB", (250, 250), (90, 120, 150)).save(big_png)  # 62500 pixels, a few hundred bytes
    long_mp4 = _tiny_video(root / "long.mp4", MAX_VIDEO_FRAMES + 10)
    ok_mp4 = _tiny_video(root / "ok.mp4", MAX_VIDEO_FRAMES - 10)
    for path in (long_wav, big_png, long_mp4):
        assert path.stat().st_size < 2**20, "under the byte limit: the other limit must refuse it"
    before = stored(env)
    png, wav = env["image"].read_bytes(), env["tiny_audio"].read_bytes()
    with env["server"].client() as c:
        def post(**files):
            return c.post("/v1/jobs", files={k: (f"{k}.bin", v, "application/octet-stream") for k, v in files.items()},
                          data={"settings": json.dumps(TINY)})

        b = problem(post(image=png, audio=long_wav.read_bytes()), 413)
        assert f"at most {MAX_AUDIO_SECONDS} s" in b["detail"], b
        b = problem(post(image=big_png.read_bytes(), audio=wav), 413)
        assert "62500 pixels" in b["detail"] and str(MAX_IMAGE_PIXELS) in b["detail"], b
        b = problem(post(video=long_mp4.read_bytes(), audio=wav), 413)
        assert f"has {MAX_VIDEO_FRAMES + 10} frames" in b["detail"] and f"at most {MAX_VIDEO_FRAMES}" in b["detail"], b
        b = problem(post(audio=wav, audio2=long_wav.read_bytes(), image=png), 413)  # the second speaker too
        assert "audio2" in b["detail"], b
        assert stored(env) == before, "a refused upload left something behind"
        # under the limits the same kinds of files pass the upload checks (the video then runs as a job)
        answer = post(video=ok_mp4.read_bytes(), audio=wav)
        assert answer.status_code == 201, answer.text
        wait_for(c, answer.json()["id"], ended)


class _Hook(_Receiver):
    """A receiver that accepts every call."""

    calls: list = []
    fail_first = False


def test_webhook_of_a_cancelled_job(env):
    from standardwebhooks.webhooks import Webhook

    with _receiving(_Hook) as url, env["server"].client() as c:
        job = submit(c, env["image"], env["audio"], WINDOWS, webhook_url=url)  # 6 windows
        wait_for(c, job["id"], lambda j: j["state"] == "running" and j["progress"]["stage"] == "sample" or ended(j))
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        assert wait_for(c, job["id"], ended, timeout=120)["state"] == "cancelled"
        deadline = time.monotonic() + 60
        while not _Hook.calls:
            assert time.monotonic() < deadline, "no webhook call in 60 s"
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while True:  # the attempt is recorded just after the answer
            log = c.get(f"/v1/jobs/{job['id']}/webhooks").json()["deliveries"]
            if log and log[0]["state"] == "delivered" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert len(_Hook.calls) == 1
    headers, body = _Hook.calls[0]
    secret = (env["server"].data / "webhook_secret").read_text().strip()
    Webhook(secret).verify(body, {k.lower(): v for k, v in headers.items()})
    payload = json.loads(body)
    assert payload["type"] == "job.cancelled" and payload["data"]["id"] == job["id"]
    assert payload["data"]["state"] == "cancelled"
    assert len(log) == 1 and log[0]["event"] == "job.cancelled" and log[0]["state"] == "delivered", log


def test_settings_speech_from_text_and_vram(tmp_path):
    from infinitetalk.server.config import ServerConfig
    from infinitetalk.server.security import Problem
    from infinitetalk.server.submit import build_spec

    cfg = ServerConfig(data=tmp_path, model="tiny")
    image = {"image": tmp_path / "in" / "image.png"}
    spec = build_spec({"text": "(s1) Hi. (s2) Hello.", "voice": "af_heart", "voice2": "am_adam", "lang": "a",
                       "speed": 1.1, "vram": 12}, image, tmp_path, cfg)
    assert spec["text"] == "(s1) Hi. (s2) Hello." and spec["voice2"] == "am_adam" and spec["speed"] == 1.1
    assert "audio" not in spec and spec["runtime"] == {"model": "tiny", "vram": 12.0}
    assert build_spec({"text": "Hi.", "runtime": {"vram": "none"}}, image, tmp_path, cfg)["runtime"]["vram"] is None
    assert build_spec({"text": "Hi.", "vram": "auto"}, image, tmp_path, cfg)["runtime"]["vram"] == "auto"
    for settings, words in (({"text": "Hi.", "vram": "lots"}, "vram must be a positive number of GB"),
                            ({"text": "Hi.", "vram": -1}, "vram must be a positive number of GB"),
                            ({"text": "Hi.", "voice": "../../etc/passwd"}, "voice must be a voice name"),
                            ({"text": "Hi.", "voice2": "/tmp/v.pt"}, "voice2 must be a voice name"),
                            ({"text_file": "/etc/passwd"}, "not as a file name"),
                            ({"text": "Hi.", "save_audio": "/tmp/x.wav"}, "decided by the server"),
                            ({"text": "Hi.", "restart": True}, "decided by the server"),
                            ({"text": 3}, "text must be text"),
                            ({}, "or the words to speak as the setting text")):
        with pytest.raises(Problem) as info:
            build_spec(settings, image, tmp_path, cfg)
        assert info.value.status == 422 and words in info.value.detail, (settings, info.value.detail)
    with pytest.raises(Problem, match="either as audio or as text"):
        build_spec({"text": "Hi."}, {**image, "audio": tmp_path / "in" / "audio.wav"}, tmp_path, cfg)


def test_text_job_without_audio(env):
    s = env["server"]
    script = "(s1) Hello there. (s2) Hi."
    png = env["image"].read_bytes()
    with s.client() as c:
        def post(settings):
            return c.post("/v1/jobs", files={"image": ("face.png", png, "image/png")},
                          data={"settings": json.dumps({**TINY, **settings})})

        # no Kokoro-82M in the server's weights folder: refused at once with the missing-weights sentence
        before = stored(env)
        answer = post({"text": script})
        assert answer.status_code == 422 and answer.headers["content-type"].startswith("application/problem+json")
        detail = answer.json()["detail"]
        assert detail.startswith("Text-to-speech weights (Kokoro-82M) not found in " + str(env["weights"])), detail
        assert f"infinitetalk download --tts --dir {env['weights']}" in detail and "\n" not in detail
        assert "Traceback" not in answer.text and stored(env) == before

        pytest.importorskip("kokoro", reason="the optional 'tts' extra (kokoro) is not installed")
        from test_tts import make_tts_weights

        make_tts_weights(env["weights"])  # random Kokoro weights (noise), laid out as the download leaves them
        answer = post({"text": script, "voice": "af_heart", "voice2": "am_adam", "speed": 1.0})
        assert answer.status_code == 201, answer.text
        job = answer.json()
        assert job["settings"]["text"] == script and "audio" not in job["settings"]
        done = wait_for(c, job["id"], ended)
        assert done["state"] == "succeeded", done
        video = c.get(done["result"]["url"])
    path = env["root"] / "text.mp4"
    path.write_bytes(video.content)
    with av.open(str(path)) as mp4:
        assert mp4.streams.audio and sum(1 for _ in mp4.decode(video=0)) == done["result"]["frames"] == 5


def test_worker_keeps_the_loaded_model_key_after_a_cancelled_job(tmp_path, media_dir):
    """In-process: a worker whose first job is cancelled after its model loaded schedules by that model."""
    import shutil as sh

    from infinitetalk.server.config import ServerConfig
    from infinitetalk.server.metrics import Metrics
    from infinitetalk.server.store import open_store
    from infinitetalk.server.submit import build_spec, check_job
    from infinitetalk.server.worker import Worker

    cfg = ServerConfig(data=tmp_path / "data", model="tiny", heartbeat_timeout=0.8)
    cfg.jobs_dir.mkdir(parents=True)
    store = open_store(cfg.db_url())
    worker = Worker(store, cfg, "cpu", Metrics(store, ("cpu",)), threading.Condition())
    folder = cfg.jobs_dir / ("job_" + "a" * 22)
    (folder / "inputs").mkdir(parents=True)
    files = {"image": folder / "inputs" / "image.png", "audio": folder / "inputs" / "audio.wav"}
    sh.copy(small_image(tmp_path, media_dir), files["image"])
    sh.copy(short_wav(tmp_path, media_dir, 1.0), files["audio"])
    spec = build_spec(dict(WINDOWS), files, folder, cfg)
    key = check_job(spec, folder, cfg)
    store.insert(folder.name, spec, key, None)
    job = store.claim(worker.id, None, cfg.model_wait)
    assert job is not None and worker.loaded_key is None
    store.request_cancel(job.id)  # the heartbeat sees it while the job runs: cancelled at the next step
    worker._run(job)  # noqa: SLF001 - the worker's loop body, on this thread
    assert store.get(job.id).state == "cancelled"
    assert worker.service.loads == 1 and worker.loaded_key == key, "the model stays loaded: schedule by it"
