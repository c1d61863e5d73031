"""The API's cost bounds: body size (413), admission (503 + Retry-After), pixel bombs and huge prompts
(400 naming the field), long conversations, and cancellation when a client goes away; then all of
them at once against a real uvicorn server on 127.0.0.1, with normal requests that must still answer
and a bound on the process's memory growth.

The server runs in this process (uvicorn in a thread) on the built-in tiny model, so its memory is
this process's (VmHWM in /proc/self/status, reset through /proc/self/clear_refs).
"""
import base64
import io
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from tiny_model import tiny_model_path

from llava_drip.serve.api import Admission, create_app
from llava_drip.serve.engine import ChatEngine

MODEL = "llava-drip-tiny"
FIELD = "messages[0].content[1].image_url.url"
MB = 1024 * 1024


class TalkativeEngine(ChatEngine):
    """Never emits EOS, so a generation runs to max_tokens unless it is cancelled: the tiny model
    otherwise stops within a few tokens, and a cancel could not be told from a natural end."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._suppress_ids = tuple(self._eos_ids)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from llava_drip.serve.builtin import SHIPPED
    shipped = os.path.isfile(os.path.join(SHIPPED, "config.json"))
    return TalkativeEngine(SHIPPED if shipped else tiny_model_path(tmp_path_factory))


def bomb_png(side: int = 12000) -> bytes:
    """A real, valid RGB PNG of side x side black pixels: ~200 KB on disk, side^2 * 3 bytes decoded
    (432 MB at 12000; PIL needs several times that on the way)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z, row = zlib.compressobj(9), bytes(3 * side + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb_url() -> str:
    return "data:image/png;base64," + base64.b64encode(bomb_png()).decode()


def _image_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), "orange").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _vision(url: str) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": "What color is it?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def _long_conversation(turns: int = 2000) -> list:
    messages = [{"role": "user", "content": "hi"}]
    for i in range(turns // 2):
        messages += [{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": "and then?"}]
    return messages


# ---- in-process (TestClient): each limit on its own ---------------------------------------------------
@pytest.fixture(scope="module")
def http(engine):
    from fastapi.testclient import TestClient
    with TestClient(create_app(engine, MODEL, max_body_bytes=100_000)) as client:
        yield client


def test_body_over_the_limit_is_413_from_content_length_or_while_reading(http):
    small = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert http.post("/v1/chat/completions", json=small).status_code == 200
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
    for content in (big, iter([big[i:i + 8192] for i in range(0, len(big), 8192)])):  # sized, then chunked
        r = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        e = r.json()["error"]
        assert e["code"] == "request_too_large" and e["type"] == "invalid_request_error"
        assert "over the limit of 0.1 MB (--max-body-mb)" in e["message"]
    r = http.post("/v1/chat/completions", content=b"{}", headers={"Content-Length": "12abc"})
    assert r.status_code == 400


def test_pixel_bomb_is_400_naming_the_field(engine, bomb_url):
    from fastapi.testclient import TestClient
    with TestClient(create_app(engine, MODEL)) as client:  # the default body limit takes the bomb's URL
        r = client.post("/v1/chat/completions", json={"messages": _vision(bomb_url), "max_tokens": 2})
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["param"] == FIELD and e["code"] == "image_too_large"
    assert e["message"].startswith(FIELD) and "over the limit of" in e["message"] and "Mpx" in e["message"]
    assert "object at 0x" not in e["message"] and "\n" not in e["message"]


def test_huge_prompt_is_refused_at_once_naming_the_field(engine):
    from fastapi.testclient import TestClient
    with TestClient(create_app(engine, MODEL)) as client:
        for messages, param in (([{"role": "user", "content": "word " * MB}], "messages[0].content"),
                                ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "yo"}, {"role": "user", "content": "z" * (5 * MB)}],
                                 "messages[3].content")):
            for stream in (False, True):
                r = client.post("/v1/chat/completions", json={"messages": messages, "stream": stream})
                assert r.status_code == 400, r.text
                e = r.json()["error"]
                assert e["param"] == param and "characters; this model reads at most" in e["message"], e


def test_2000_turn_conversation_is_answered(engine):
    from fastapi.testclient import TestClient
    with TestClient(create_app(engine, MODEL)) as client:
        r = client.post("/v1/chat/completions", json={"messages": _long_conversation(), "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] <= engine.max_prompt_tokens


class _BlockingEngine:
    """Just enough of a ChatEngine for the API: chat() waits until `go` is set."""

    def __init__(self):
        self.go, self.inside = threading.Event(), threading.Semaphore(0)

    def resolve_budget(self, budget):
        return None

    def check_prompt_length(self, messages):
        return messages

    def budget_label(self, budget):
        return "model default"

    def chat(self, messages, image, cancel=None, **kwargs):
        from llava_drip.serve.engine import ChatStats
        self.inside.release()
        self.go.wait(30)
        return "ok", ChatStats(0, 0, 1, 1, 0.0)


def test_over_max_concurrent_is_503_with_retry_after():
    from fastapi.testclient import TestClient
    fake = _BlockingEngine()
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with TestClient(create_app(fake, MODEL, max_concurrent=2)) as client, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(client.post, "/v1/chat/completions", json=body) for _ in range(2)]
        assert fake.inside.acquire(timeout=30) and fake.inside.acquire(timeout=30)  # both slots taken
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        e = r.json()["error"]
        assert e["code"] == "server_busy" and e["type"] == "server_error" and "--max-concurrent" in e["message"]
        assert client.get("/v1/models").status_code == 200  # only chat requests count
        fake.go.set()
        assert [f.result(timeout=30).status_code for f in held] == [200, 200]
        assert client.post("/v1/chat/completions", json=body).status_code == 200  # slots given back
        assert client.app.state.admission.active == 0


def test_admission_counts():
    a = Admission(1)
    assert a.try_enter() and not a.try_enter()
    a.leave()
    assert a.try_enter()
    with pytest.raises(ValueError):
        Admission(0)


def test_flags_reach_the_app(monkeypatch, capsys):
    import uvicorn

    from llava_drip.serve import api
    from llava_drip.serve import engine as engine_module
    seen = {}
    monkeypatch.setattr(engine_module, "ChatEngine", lambda *a, **k: _BlockingEngine())
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    monkeypatch.setattr(logging.getLogger("llava_drip"), "handlers", [])  # main adds one: not for later tests
    assert api.main(["--model-path", "/nowhere", "--max-body-mb", "0.5", "--max-concurrent", "3"]) == 0
    assert (seen["app"].state.admission.limit, seen["app"].state.max_body_bytes) == (3, 500_000)
    assert api.main(["--model-path", "/nowhere", "--max-concurrent", "0"]) == 2
    assert "--max-concurrent" in capsys.readouterr().err


# ---- a real server: uvicorn on 127.0.0.1 ---------------------------------------------------------------
@pytest.fixture(scope="module")
def live(engine):
    """(base URL, app) of uvicorn serving `engine` on a free port of 127.0.0.1, in a thread."""
    import uvicorn
    app = create_app(engine, MODEL, max_concurrent=16)  # the default body limit (20 MB)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=15)


def _post(base: str, body: dict, timeout: float = 120):
    """(status, JSON body) of one chat request."""
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _raw(base: str, head: str, body_parts, read_response: bool = True) -> tuple:
    """Send a hand-written request (for bodies no client library would send); (status, JSON) of the answer."""
    host, port = re.match(r"http://([\d.]+):(\d+)", base).groups()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head.encode())
        try:
            for part in body_parts:
                s.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the rest: read what it said
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            more = s.recv(65536)
            if not more:
                break
            data += more
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def _length(data: bytes) -> int:
    m = re.search(rb"content-length: (\d+)", data.split(b"\r\n\r\n", 1)[0], re.I)
    return int(m.group(1)) if m else 1 << 30


def _oversized_content_length(base):
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 * MB}\r\n\r\n")
    return _raw(base, head, [b'{"messages": [' + b" " * 65536])


def _oversized_chunked(base):
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    piece = b" " * MB
    parts = [b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(21)]  # 21 MB, just over the default
    return _raw(base, head, parts)


def _stream_then_leave(base: str, max_tokens: int = 900) -> None:
    """A streaming client that reads the first content chunk and closes the connection."""
    body = json.dumps({"messages": [{"role": "user", "content": "Describe the picture."}], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    host, port = re.match(r"http://([\d.]+):(\d+)", base).groups()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        seen = b""
        while seen.count(b"data: ") < 2:  # the role chunk, then the first piece of text
            more = s.recv(4096)
            assert more, "the stream ended before any text"
            seen += more


def _ask_then_leave(base: str, wait_s: float = 0.5, max_tokens: int = 900) -> None:
    """A non-streaming client that gives up before the answer."""
    body = json.dumps({"messages": [{"role": "user", "content": "Describe the picture."}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    host, port = re.match(r"http://([\d.]+):(\d+)", base).groups()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(wait_s)


def _cancelled(caplog) -> list:
    """(generated, max) of each 'generation cancelled after N of M new tokens' line in the log."""
    return [tuple(map(int, m.groups())) for m in
            re.finditer(r"generation cancelled after (\d+) of (\d+) new tokens", caplog.text)]


def _wait_idle(engine, app, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not engine._lock.locked() and app.state.admission.active == 0:
            return True
        time.sleep(0.05)
    return False


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def test_expensive_requests_do_not_starve_normal_ones(live, engine, bomb_url, caplog):
    base, app = live
    image = _image_url()
    try:  # from here VmHWM is the peak of this test, not of loading the model
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _kb("VmRSS")
    expensive = {
        "bomb": lambda: _post(base, {"messages": _vision(bomb_url), "max_tokens": 2}),
        "content_length": lambda: _oversized_content_length(base),
        "chunked": lambda: _oversized_chunked(base),
        "huge_prompt": lambda: _post(base, {"messages": [{"role": "user", "content": "word " * MB}]}),
        "2000_turns": lambda: _post(base, {"messages": _long_conversation(), "max_tokens": 2}),
        "leaves": lambda: _stream_then_leave(base),
    }
    normal = [{"messages": _vision(image), "max_tokens": 4, "temperature": 0},
              {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}] * 2
    with caplog.at_level(logging.INFO, logger="llava_drip"), ThreadPoolExecutor(len(expensive) + len(normal)) as pool:
        t0 = time.time()
        costly = {k: pool.submit(f) for k, f in expensive.items()}
        plain = [pool.submit(_post, base, body) for body in normal]
        answers = [f.result(timeout=120) for f in plain]
        normal_s = time.time() - t0
        got = {k: f.result(timeout=120) for k, f in costly.items()}
        assert _wait_idle(engine, app), "the engine stayed busy after the client left"
    peak_growth_mb = (_kb("VmHWM") - before) / 1024

    for status, body in answers:  # normal requests: answered in full
        assert status == 200, body
        assert 1 <= body["usage"]["completion_tokens"] <= 4
    assert normal_s < 90, f"normal requests took {normal_s:.0f} s"  # loose: a loaded 2-core machine
    status, body = got["bomb"]
    assert status == 400 and body["error"]["param"] == FIELD and body["error"]["code"] == "image_too_large"
    assert "object at 0x" not in body["error"]["message"]
    for kind in ("content_length", "chunked"):
        status, body = got[kind]
        assert status == 413 and body["error"]["code"] == "request_too_large", (kind, body)
    status, body = got["huge_prompt"]
    assert status == 400 and body["error"]["param"] == "messages[0].content"
    status, body = got["2000_turns"]
    assert status == 200 and body["usage"]["prompt_tokens"] <= engine.max_prompt_tokens
    cut = _cancelled(caplog)
    assert len(cut) == 1 and cut[0][0] < cut[0][1], caplog.text  # the stream that was left: stopped early
    assert peak_growth_mb < 500, f"the process grew by {peak_growth_mb:.0f} MB"
    status, body = _post(base, normal[1])  # and the server is free for the next one
    assert status == 200


def test_client_leaving_stops_generation(live, engine, caplog):
    base, app = live
    for leave in (_stream_then_leave, _ask_then_leave):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llava_drip"):
            leave(base)
            assert _wait_idle(engine, app), f"{leave.__name__}: the engine stayed busy"
        cut = _cancelled(caplog)
        assert len(cut) == 1 and cut[0][0] < cut[0][1], (leave.__name__, caplog.text)
        status, body = _post(base, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
