"""The OpenAI-compatible API: a real `llava-drip serve-api` process driven by the `openai` client,
plus the DRIP budget (`drip_budget` per request, `--budget` per server) in-process."""
import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from PIL import Image
from tiny_model import tiny_engine, tiny_llava  # noqa: F401  (fixtures)

from llava_drip.data.shapes import Scene, render, rng_for

openai = pytest.importorskip("openai")

API_KEY = "test-key-9f3b2c"  # a made-up key: the test checks it never reaches the server's output
MODEL_ID = "tiny-llava-drip"


def _data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def image_url() -> str:
    return _data_url(render(Scene("triangle", "orange", "large", "right", 1, "plain"), rng_for(0, 1000, 3), 96))


@pytest.fixture(scope="module")
def server(tiny_llava):
    """(base_url, output lines). Port 0 lets the OS choose; uvicorn prints the real one."""
    env = dict(os.environ, LLAVA_DRIP_API_KEY=API_KEY, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "llava_drip.cli", "serve-api", "--model-path", tiny_llava, "--port", "0",
           "--model-name", MODEL_ID]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, found = [], threading.Event()
    url = {}

    def reader():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url["base"] = m.group(1)
                found.set()

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.time() + 120
    while not found.is_set() and proc.poll() is None and time.time() < deadline:
        found.wait(0.2)
    if not found.is_set():
        proc.kill()
        pytest.fail("serve-api did not start:\n" + "".join(lines))
    yield url["base"], lines
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _vision_message(url: str, text: str = "What color are the shapes in the image?") -> list:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]


def test_chat_completion_with_image(client, image_url):
    r = client.chat.completions.create(model=MODEL_ID, messages=_vision_message(image_url),
                                       temperature=0, max_tokens=16)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert 1 <= u.completion_tokens <= 16 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    vt = r.model_extra["visual_tokens"]
    assert 1 <= vt["out"] <= vt["in"] == 64 and vt["budget"] is None  # the model's default
    assert u.prompt_tokens > vt["out"]


def test_streaming_matches_non_streaming(client, image_url):
    kwargs = dict(model=MODEL_ID, messages=_vision_message(image_url), temperature=0, max_tokens=16)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == full.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["visual_tokens"] == full.model_extra["visual_tokens"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stream_ends_with_done(server, image_url):
    body = json.dumps({"model": MODEL_ID, "messages": _vision_message(image_url), "max_tokens": 4,
                       "stream": True}).encode()
    req = urllib.request.Request(server[0] + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_text_only_and_multi_turn(client):
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": [{"type": "text", "text": "What shapes do you know?"}]}]
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=8)
    assert r.model_extra["visual_tokens"] == {"in": 0, "out": 0, "budget": None}
    assert r.usage.completion_tokens >= 1


@pytest.mark.parametrize("url,needle", [
    ("https://example.com/cat.png", "does not fetch URLs"),
    ("file:///etc/hosts", "data URL"),
    ("data:image/png;base64,@@notbase64@@", "invalid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "is not an image file"),
])
def test_bad_image_url_is_400_naming_the_field(client, url, needle):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=_vision_message(url))
    e = err.value.body
    assert err.value.status_code == 400
    assert e["param"] == "messages[0].content[1].image_url.url" and needle in e["message"]
    assert e["type"] == "invalid_request_error"


def test_other_bad_requests(client, image_url):
    two_images = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                               {"type": "image_url", "image_url": {"url": image_url}}]}]
    cases = [(dict(messages=[]), "messages"),
             (dict(messages=two_images), "messages[0].content[1]"),
             (dict(messages=[{"role": "assistant", "content": "x"}]), "messages"),
             (dict(messages=[{"role": "user", "content": "x"}], temperature=5), "temperature"),
             (dict(messages=[{"role": "user", "content": "x"}], max_tokens=0), "max_tokens"),
             (dict(messages=[{"role": "user", "content": "x"}], n=2), "n")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL_ID, **kwargs)
        assert err.value.body["param"] == param, (kwargs, err.value.body)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"


def test_invalid_json_is_openai_shaped_400(server):
    req = urllib.request.Request(server[0] + "/v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    assert "not valid JSON" in json.loads(err.value.read())["error"]["message"]


def test_api_key_required_and_never_logged(server):
    base, lines = server
    wrong = openai.OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": API_KEY}):  # no header; key without the Bearer scheme
        req = urllib.request.Request(base + "/v1/chat/completions", data=b"{}", method="POST", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 401 and json.loads(err.value.read())["error"]["code"] == "invalid_api_key"
    output = "".join(lines)
    assert "API key required" in output and API_KEY not in output


def test_no_key_configured_allows_requests(tiny_engine):
    from fastapi.testclient import TestClient
    from llava_drip.serve.api import create_app
    with TestClient(create_app(tiny_engine, "m", api_key=None)) as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert http.get("/v1/models").json()["data"][0]["id"] == "m"
        missing = http.get("/v1/nothing-here")
        assert missing.status_code == 404 and "error" in missing.json()


# ---- DRIP budgets -------------------------------------------------------------------------------------
def _scene_url(index: int, background: str) -> str:
    return _data_url(render(Scene("star", "blue", "large", "center", 3, background), rng_for(0, 1000, index), 96))


@pytest.mark.parametrize("budget,out", [("0.25", 16), (0.5, 32), (8, 8), ("8", 8), ("1.0", 64), (1, 1)])
def test_drip_budget_sets_the_kept_tokens(client, image_url, budget, out):
    r = client.chat.completions.create(model=MODEL_ID, messages=_vision_message(image_url), temperature=0,
                                       max_tokens=2, extra_body={"drip_budget": budget})
    expected = {"0.25": "0.25", 0.5: "0.5", 8: "8", "8": "8", "1.0": "1.0", 1: "1"}[budget]
    assert r.model_extra["visual_tokens"] == {"in": 64, "out": out, "budget": expected}


def test_drip_budget_when_streaming(client, image_url):
    kwargs = dict(model=MODEL_ID, messages=_vision_message(image_url), temperature=0, max_tokens=4,
                  extra_body={"drip_budget": "mean:0.5"})
    full = client.chat.completions.create(**kwargs).model_extra["visual_tokens"]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert full["budget"] == "mean:0.5" and 1 <= full["out"] <= 64
    assert finish[0].model_extra["visual_tokens"] == full == chunks[-1].model_extra["visual_tokens"]


def test_counts_differ_between_images_at_the_default_and_at_a_mean(client):
    urls = [_scene_url(0, "plain"), _scene_url(1, "stripes"), _data_url(Image.new("RGB", (96, 96), "white"))]
    for budget in (None, "mean:0.25"):
        extra = {} if budget is None else {"extra_body": {"drip_budget": budget}}
        kept = [client.chat.completions.create(model=MODEL_ID, messages=_vision_message(u), temperature=0,
                                               max_tokens=1, **extra).model_extra["visual_tokens"] for u in urls]
        assert {vt["budget"] for vt in kept} == {budget}
        assert len({vt["out"] for vt in kept}) > 1, (budget, kept)


@pytest.mark.parametrize("budget,needle", [("abc", "invalid budget"), (2.5, "(0, 1]"), (0, "whole number"),
                                           ("mean:0", "(0, 1]"), (True, "string or a number"),
                                           ([0.25], "string or a number"), (65, "64 patches")])
def test_bad_drip_budget_is_400_naming_the_field(client, image_url, budget, needle):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL_ID, messages=_vision_message(image_url), stream=stream,
                                           extra_body={"drip_budget": budget})
        e = err.value.body
        assert err.value.status_code == 400 and e["param"] == "drip_budget", e
        assert e["message"].startswith("drip_budget") and needle in e["message"], e


def test_startup_line_names_the_default_budget(server):
    assert "DRIP budget model default (mean:0.25)" in "".join(server[1])


def test_server_wide_budget(tiny_engine, image_url):
    from fastapi.testclient import TestClient
    from llava_drip.serve.api import create_app
    body = {"messages": _vision_message(image_url), "max_tokens": 1, "temperature": 0}
    with TestClient(create_app(tiny_engine, "m", budget="0.5")) as http:
        assert http.post("/v1/chat/completions", json=body).json()["visual_tokens"] == \
            {"in": 64, "out": 32, "budget": "0.5"}
        for given, out, shown in ((8, 8, "8"), (None, 32, "0.5")):  # a request's drip_budget wins; null: the server's
            r = http.post("/v1/chat/completions", json={**body, "drip_budget": given}).json()
            assert r["visual_tokens"] == {"in": 64, "out": out, "budget": shown}
    with pytest.raises(ValueError, match="64 patches"):
        create_app(tiny_engine, "m", budget=100)


@pytest.fixture
def builtin_folder(tmp_path, monkeypatch):
    """A stand-in for the shipped built-in model's folder, so the real one is not loaded."""
    from llava_drip.serve import builtin
    shipped = tmp_path / "assets" / "tiny-llava"
    shipped.mkdir(parents=True)
    (shipped / "MANIFEST.json").write_text("{}")
    monkeypatch.setattr(builtin, "SHIPPED", str(shipped))
    return shipped


def test_default_model_id(builtin_folder, tmp_path, capsys):
    from llava_drip.serve.api import default_model_id
    from llava_drip.serve.builtin import resolve_model_path
    path = resolve_model_path(None)  # no --model-path
    assert path == str(builtin_folder) and "using the built-in tiny model" in capsys.readouterr().out
    assert default_model_id(path) == "llava-drip-tiny"
    assert default_model_id(str(builtin_folder) + "/") == "llava-drip-tiny"  # the same folder, however written
    assert default_model_id(str(tmp_path / "runs" / "stage2")) == "stage2"  # another model: its folder's name


def test_help_says_where_the_builtin_model_is(builtin_folder, capsys):
    from llava_drip.serve import api
    with pytest.raises(SystemExit):
        api.main(["--help"])
    out = capsys.readouterr().out
    assert str(builtin_folder) in "".join(out.split())  # argparse wraps the path
    assert "llava-drip-tiny" in out
    assert "--max-body-mb" in out and "--max-concurrent" in out  # the request limits


@pytest.mark.parametrize("budget", ["abc", "1.5", "mean:"])
def test_bad_budget_flag_fails_at_startup(budget, tmp_path, capsys):
    from llava_drip import cli
    assert cli.main(["serve-api", "--model-path", str(tmp_path / "no-model"), "--budget", budget]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llava-drip serve-api: --budget: "), err
