"""`sdort serve`: the real server in a subprocess on a free local port, spoken to over real HTTP
(urllib). Parity with the `sdort` command is exact pixel equality: the same process code, the same
options, the same seed and the same ONNX Runtime kernels on the same machine, so any difference would
be a difference in what the server asked the pipeline to do."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MAX_PIXELS = 64 * 64  # the server's --max-pixels: 64x64 passes, 72x64 does not
MAX_BODY_MB = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, path: str, body=None, raw: bytes | None = None, timeout: float = 120):
    """(status, JSON answer) of a GET (no body) or a POST."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, json.loads(text)  # every answer is JSON, errors included


def sdort(*args) -> None:
    """`sdort <args>`, the command's own code run in this process (a subprocess would only add start-up)."""
    from sdort.runtime.cli import main

    assert main(list(args)) == 0


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    """One `sdort serve` for the module: one worker, one waiting place, small limits."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sdort.runtime.cli", "serve", "--model", str(tiny_export), "--port", str(port),
             "--max-concurrency", "1", "--queue-size", "1", "--max-pixels", str(MAX_PIXELS),
             "--max-body-mb", str(MAX_BODY_MB), "--max-images", "4", "--provider", "cpu"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"the server exited: {log.read_text()}"
        try:
            if call(url, "/health", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no health answer: {log.read_text()}"
        time.sleep(0.2)
    yield url, log
    process.terminate()
    process.wait(timeout=30)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_b64(array: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_txt2img_gives_the_cli_pixels_for_each_iteration_seed(server, tiny_export, tmp_path):
    url, _ = server
    status, answer = call(url, "/sdapi/v1/txt2img", {
        "prompt": "a red fox", "negative_prompt": "blurry", "seed": 42, "steps": 2, "cfg_scale": 6, "width": 48,
        "height": 32, "sampler_name": "Euler a", "n_iter": 2, "batch_size": 1,
        # fields A1111 clients send that do not change sdort's image: accepted, ignored
        "subseed": -1, "subseed_strength": 0, "restore_faces": False, "tiling": False, "styles": [],
        "alwayson_scripts": {}, "script_args": [], "send_images": True, "save_images": False, "eta": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1}, "sampler_index": "Euler"})
    assert status == 200, answer
    assert len(answer["images"]) == 2 and answer["parameters"]["seed"] == 42
    info = json.loads(answer["info"])
    assert info["seed"] == 42 and info["all_seeds"] == [42, 43]  # A1111: batch i starts at seed + i * batch_size
    assert info["sampler_name"] == "Euler a" and (info["width"], info["height"]) == (48, 32)
    for image, seed, infotext in zip(answer["images"], (42, 43), info["infotexts"]):
        out = tmp_path / f"cli-{seed}.png"
        sdort("txt2img", "--model", str(tiny_export), "a red fox", "--negative-prompt", "blurry", "--seed", str(seed),
              "--steps", "2", "--guidance", "6", "--width", "48", "--height", "32", "--scheduler", "euler_a", "-o", str(out))
        with Image.open(out) as cli:
            np.testing.assert_array_equal(pixels(image), np.asarray(cli.convert("RGB")))
            assert cli.text["parameters"] == infotext  # A1111's PNG text, the same from both
        # the PNG sent carries the same parameters as the command's file
        assert Image.open(io.BytesIO(base64.b64decode(image))).text["parameters"] == infotext


def test_img2img_and_inpaint_give_the_cli_pixels(server, tiny_export, tmp_path):
    url, _ = server
    start = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(start).save(tmp_path / "start.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = {"prompt": "an oil painting", "seed": 7, "steps": 3, "denoising_strength": 0.6, "sampler_name": "DDIM"}
    # with a data: URL prefix for the image, plain base64 for the mask: A1111 reads both
    status, img2img = call(url, "/sdapi/v1/img2img", {**common, "init_images": [
        "data:image/png;base64," + base64.b64encode((tmp_path / "start.png").read_bytes()).decode()]})
    assert status == 200, img2img
    assert img2img["parameters"]["init_images"] is None  # not sent back, as A1111 without include_init_images
    status, inpaint = call(url, "/sdapi/v1/img2img", {**common, "init_images": [png_b64(start)],
                                                      "mask": png_b64(mask), "mask_blur": 4, "inpainting_fill": 1})
    assert status == 200, inpaint
    for task, answer, extra in (("img2img", img2img, []), ("inpaint", inpaint, ["--mask", str(tmp_path / "mask.png")])):
        out = tmp_path / f"{task}.png"
        sdort(task, "--model", str(tiny_export), "an oil painting", "--image", str(tmp_path / "start.png"), *extra,
              "--seed", "7", "--steps", "3", "--strength", "0.6", "--scheduler", "ddim", "-o", str(out))
        np.testing.assert_array_equal(pixels(answer["images"][0]), np.asarray(Image.open(out).convert("RGB")), task)
    assert not np.array_equal(pixels(img2img["images"][0]), pixels(inpaint["images"][0]))


def test_sampler_model_and_health_routes(server):
    url, _ = server
    status, samplers = call(url, "/sdapi/v1/samplers")
    assert status == 200
    by_name = {entry["name"]: entry for entry in samplers}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(by_name)
    assert by_name["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    assert by_name["DPM++ 2M"]["options"]["schedule_types"] == ["Automatic", "Karras"]
    assert "DPM++ 2S a" not in by_name and "DPM fast" not in by_name  # sdort has no scheduler for them
    status, schedulers = call(url, "/sdapi/v1/schedulers")
    assert status == 200 and [entry["label"] for entry in schedulers] == ["Automatic", "Karras"]
    status, models = call(url, "/sdapi/v1/sd-models")
    assert status == 200 and len(models) == 1 and models[0]["model_name"] == "model"  # tiny_export's folder name
    assert call(url, "/health")[1]["status"] == "ok" and call(url, "/internal/ping") == (200, {})


def test_the_old_karras_label_and_aliases_choose_the_same_scheduler(server):
    url, _ = server
    base = {"prompt": "a boat", "seed": 5, "steps": 2, "width": 32, "height": 32}
    new = call(url, "/sdapi/v1/txt2img", {**base, "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    old = call(url, "/sdapi/v1/txt2img", {**base, "sampler_name": "DPM++ 2M Karras"})
    alias = call(url, "/sdapi/v1/txt2img", {**base, "sampler_name": "k_dpmpp_2m", "scheduler": "karras"})
    plain = call(url, "/sdapi/v1/txt2img", {**base, "sampler_name": "DPM++ 2M"})
    assert all(status == 200 for status, _ in (new, old, alias, plain))
    assert new[1]["images"] == old[1]["images"] == alias[1]["images"]
    assert json.loads(new[1]["info"])["extra_generation_params"] == {"Schedule type": "Karras"}
    assert plain[1]["images"] != new[1]["images"]  # the schedule type is not ignored


GOOD = {"prompt": "a cat", "steps": 1, "width": 32, "height": 32}
BAD_REQUESTS = [
    # (route, body (a dict, or raw bytes), status, word the detail must hold)
    ("txt2img", b"{not json", 400, "JSON"),
    ("txt2img", b"[1, 2]", 422, "object"),
    ("txt2img", {**GOOD, "steps": "abc"}, 422, "steps"),
    ("txt2img", {**GOOD, "prompt": 5}, 422, "prompt"),
    ("txt2img", {**GOOD, "cfg_scale": "high"}, 422, "cfg_scale"),
    ("txt2img", {**GOOD, "seed": 1.5}, 422, "seed"),
    ("txt2img", {**GOOD, "steps": 0}, 422, "steps"),
    ("txt2img", {**GOOD, "width": 60}, 422, "width"),
    ("txt2img", {**GOOD, "height": -8}, 422, "height"),
    ("txt2img", {**GOOD, "width": 72, "height": 64}, 422, "max-pixels"),
    ("txt2img", {**GOOD, "batch_size": 3, "n_iter": 2}, 422, "max-images"),
    ("txt2img", {**GOOD, "sampler_name": "Nope"}, 422, "sampler_name"),
    ("txt2img", {**GOOD, "sampler_name": "DPM++ 2S a"}, 422, "sampler_name"),
    ("txt2img", {**GOOD, "sampler_name": "DDIM", "scheduler": "Karras"}, 422, "scheduler"),
    ("txt2img", {**GOOD, "scheduler": "wobbly"}, 422, "scheduler"),
    ("txt2img", {**GOOD, "enable_hr": True}, 422, "enable_hr"),
    ("txt2img", {**GOOD, "override_settings": {"sd_model_checkpoint": "other.safetensors"}}, 422, "sd_model_checkpoint"),
    ("txt2img", {**GOOD, "override_settings": {"randn_source": "NV"}}, 422, "randn_source"),
    ("txt2img", {**GOOD, "prompt": "x" * (MAX_BODY_MB * 2**20 + 10)}, 413, "body"),
    ("img2img", {**GOOD}, 422, "init_images"),
    ("img2img", {**GOOD, "init_images": ["!!! not base64 !!!"]}, 422, "init_images[0]"),
    ("img2img", {**GOOD, "init_images": [base64.b64encode(b"not an image at all").decode()]}, 422, "init_images[0]"),
    ("img2img", {**GOOD, "init_images": [png_b64(np.zeros((72, 64, 3), np.uint8))]}, 422, "max-pixels"),
    ("img2img", {**GOOD, "init_images": [png_b64(np.zeros((32, 32, 3), np.uint8))], "denoising_strength": 2},
     422, "denoising_strength"),
    ("img2img", {**GOOD, "init_images": [png_b64(np.zeros((32, 32, 3), np.uint8))], "mask": "@@"}, 422, "mask"),
]


@pytest.mark.parametrize("route, body, status, word", BAD_REQUESTS,
                         ids=[f"{i}-{case[3]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_4xx_json_naming_the_field(server, route, body, status, word):
    url, _ = server
    got, answer = call(url, f"/sdapi/v1/{route}", **({"raw": body} if isinstance(body, bytes) else {"body": body}))
    assert got == status, answer
    assert word in answer["detail"] and "Traceback" not in answer["detail"], answer


def test_unknown_route_is_json_404(server):
    url, _ = server
    assert call(url, "/sdapi/v1/nothing-here")[0] == 404
    assert call(url, "/sdapi/v1/txt2img")[0] == 405  # a GET where A1111 takes a POST


def test_a_full_queue_answers_503_and_the_others_are_served(server):
    """--max-concurrency 1 and --queue-size 1: of 4 simultaneous slow requests, one runs, one waits,
    two are refused at once."""
    url, _ = server
    results = [None] * 4
    barrier = threading.Barrier(4)

    def client(i):
        barrier.wait()
        results[i] = call(url, "/sdapi/v1/txt2img", {"prompt": "slow", "seed": i, "steps": 25, "width": 64,
                                                       "height": 64, "sampler_name": "Euler"})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(status for status, _ in results) == [200, 200, 503, 503], [r[1].get("detail") for r in results]
    assert all("busy" in answer["detail"] for status, answer in results if status == 503)
    assert call(url, "/health")[1]["pending"] == 0  # every slot was given back


def test_a_failing_generation_answers_500_and_the_server_keeps_serving(server):
    url, log = server
    # a guidance scale this large overflows the latents (the prompt differs from the empty one, so the
    # guidance term is not zero): the VAE's output is refused as NaN/inf, whatever the seed
    status, answer = call(url, "/sdapi/v1/txt2img", {**GOOD, "seed": 0, "steps": 3, "cfg_scale": 1e38,
                                                     "sampler_name": "Euler"})
    assert status == 500 and answer["error"] == "GenerationFailed", answer
    assert "NaN or infinity" in answer["detail"] and "Traceback" not in answer["detail"]
    assert call(url, "/sdapi/v1/txt2img", {**GOOD, "seed": 1})[0] == 200
    assert call(url, "/health")[1] == {"status": "ok", "model": "model", "pending": 0, "capacity": 2}


def test_worker_copies_run_different_samplers_at_once_as_serially(tiny_export):
    """What --max-concurrency 2 rests on: `generate` sets the scheduler on the pipeline, so each worker
    has its own `LoadedModel.for_thread` copy; two threads running different samplers at the same time
    give exactly the images of serial runs (same process and kernels: any difference is shared state)."""
    from sdort.runtime.cli import task_options
    from sdort.runtime.generation import LoadedModel, generate

    base = LoadedModel("txt2img", str(tiny_export), "cpu")
    base.pipe.set_progress_bar_config(disable=True)
    jobs = [dict(prompt="a fox", seed=1, scheduler="euler_a"), dict(prompt="a ship", seed=2, scheduler="ddim")]

    def run(loaded, fields):
        options = task_options("txt2img", {**fields, "model": str(tiny_export), "steps": 4, "width": 32, "height": 32})
        return [np.asarray(generate(loaded, options).images[0]) for _ in range(3)]

    serial = [run(base, job) for job in jobs]
    copies, threaded = [base.for_thread() for _ in jobs], [None, None]
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        threaded[i] = run(copies[i], jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert copies[0].pipe.unet is base.pipe.unet  # the sessions are shared, not loaded again
    assert type(copies[0].pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(copies[1].pipe.scheduler).__name__ == "DDIMScheduler"
    for expected, got in zip(serial, threaded):
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
