"""The web demo end to end: ``lposs demo`` in a subprocess, driven by headless Chromium.

The demo runs on small random-weight models loaded through the real command-line path:
an OpenCLIP local folder (``--clip-model local-dir:...``) and a timm ViT-Tiny saved with
safetensors (``--dino-model vit_tiny_patch16_224 --dino-weights FILE``). Chromium is
Debian's package, driven by Playwright; nothing may leave the machine (the browser's
requests to anything but the demo are recorded and refused). One more test drives the
page's backend in-process, against the library's Segmenter.
"""

from __future__ import annotations

import io as stdio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lposs.demo import EXAMPLES, GRADIO_MISSING, examples_dir

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # per browser wait; the whole module takes far less
MAX_PIXELS = 100_000  # the demo's cap in these tests

# OpenCLIP ViT narrowed to 2 layers of width 64, as tests/conftest.py's tiny_clip.
def _requirements() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        return 'gradio is not installed (pip install "lposs[demo]")'
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return 'playwright is not installed (pip install "lposs[browser]")'
    if not os.access(CHROMIUM, os.X_OK):
        return "Chromium is not installed (Debian: apt-get install chromium)"
    return None


def _scene(height: int, width: int) -> Image.Image:
    """A drawn test scene: sky above, grass below, a sun disc, a grey house."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[: height * 3 // 5] = (90, 150, 230)
    arr[height * 3 // 5 :] = (50, 140, 40)
    image = Image.fromarray(arr)
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 3 // 4, height // 10, width * 9 // 10, height * 3 // 10],
                 fill=(255, 220, 40))
    draw.rectangle([width // 5, height * 2 // 5, width // 2, height * 3 // 4], fill=(120, 120, 120))
    return image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """The demo process's environment: offline, and importing the lposs under test (the
    process runs in another folder, where a relative PYTHONPATH would not find it)."""
    import lposs

    source = str(Path(lposs.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost"}


def _demo_command() -> list[str]:
    return [sys.executable, "-m", "lposs", "demo"]


def _demo_args(clip_dir: Path, dino_file: Path) -> list[str]:
    return ["--max-pixels", str(MAX_PIXELS), "--max-file-size", "100kb",
            "--clip-model", f"local-dir:{clip_dir}",
            "--dino-model", "vit_tiny_patch16_224", "--dino-weights", str(dino_file),
            "--short-side", "112", "--r", "5"]  # a smaller pixel graph: faster on a CPU


@pytest.fixture(scope="module")
def demo_process(tiny_model_files, tmp_path_factory):
    """``lposs demo`` starting on a free loopback port: ``(process, url, log file)``."""
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("demo")
    port = _free_port()
    env = _env()
    log = (folder / "server.log").open("w+")
    proc = subprocess.Popen(_demo_command() + ["--port", str(port), *_demo_args(*tiny_model_files)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    try:
        yield proc, f"http://127.0.0.1:{port}/", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(demo_process):
    """Headless Chromium (started while the demo loads its models)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(demo_process, browser) -> str:
    """The demo's URL, once it answers."""
    proc, url, log = demo_process
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"lposs demo exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("lposs demo did not answer within 90 s")
        time.sleep(0.25)


@pytest.fixture
def page(browser, server):
    """A fresh page on the demo; requests leaving 127.0.0.1 are refused and recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.external_requests = []

    def guard(route):
        url = route.request.url
        if url.startswith(server) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            page.external_requests.append(url)
            route.abort()

    page.route("**/*", guard)
    page.goto(server)
    page.locator("#lposs-run").wait_for()
    yield page
    context.close()


def _upload(page, path: Path) -> None:
    page.locator("#lposs-image input[type=file]").set_input_files(str(path))


def _run(page, classes: str, expect: str, *, press_enter: bool = False) -> str:
    """Type classes, run, wait until the status shows ``expect`` and return the status."""
    box = page.locator("#lposs-classes textarea, #lposs-classes input").first
    box.fill(classes)
    if press_enter:
        box.press("Enter")
    else:
        page.locator("#lposs-run").click()
    status = page.locator("#lposs-status")
    try:
        page.wait_for_function(
            "([sel, text]) => document.querySelector(sel).innerText.includes(text)",
            arg=["#lposs-status", expect],
        )
    except Exception as err:
        raise AssertionError(f"status {status.inner_text()!r} never showed {expect!r}") from err
    return status.inner_text()


def _shares_table(page) -> dict[str, float]:
    rows = page.locator("#lposs-shares tbody tr")
    table = {}
    for i in range(rows.count()):
        cells = rows.nth(i).locator("td")
        table[cells.nth(1).inner_text()] = float(cells.nth(2).inner_text().rstrip("%")) / 100
    return table


def _download(page, server: str, suffix: str) -> bytes:
    link = page.locator(f"#lposs-files a[href*='{suffix}']").first
    href = link.get_attribute("href")
    response = page.request.get(href if href.startswith("http") else server + href.lstrip("/"))
    assert response.ok, response.status
    return response.body()


def test_upload_segment_and_change_classes_reuses_encoding(page, server, tmp_path):
    image_path = tmp_path / "scene.png"
    _scene(120, 160).save(image_path)
    _upload(page, image_path)
    status = _run(page, "sky, grass;lawn, house", "Segmented a 160x120 image into 3 classes")
    assert "the image was encoded" in status

    # The overlay appears: the image plus a legend panel to its right.
    overlay = page.locator("#lposs-overlay img").first
    overlay.wait_for()
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=overlay.element_handle())
    natural = overlay.evaluate("el => [el.naturalWidth, el.naturalHeight]")
    assert natural[0] > 160 and natural[1] >= 120
    shares = _shares_table(page)
    assert list(shares) == sorted(shares, key=lambda name: -shares[name])  # largest first
    assert set(shares) == {"sky", "grass;lawn", "house"}
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.005)  # each rounded to 0.1 %

    # The downloads: a label PNG at the image's size and a JSON whose shares are the
    # label histogram (counted here independently).
    labels = np.array(Image.open(stdio.BytesIO(_download(page, server, "scene_lposs.png"))))
    summary = json.loads(_download(page, server, "scene_lposs.json"))
    assert labels.shape == (120, 160)
    assert [c["name"] for c in summary["classes"]] == ["sky", "grass;lawn", "house"]
    for c in summary["classes"]:
        assert c["share"] == pytest.approx(np.mean(labels == c["index"]))
        assert shares[c["name"]] == pytest.approx(c["share"], abs=0.0006)

    # A bad input clears the result: no stale segmentation next to an error message.
    _run(page, "sky, grass, Sky", "Error: duplicate class name 'Sky'")
    assert page.locator("#lposs-shares tbody tr").count() == 0
    assert page.locator("#lposs-overlay img").count() == 0

    # Only the vocabulary changes: the encoders do not run again.
    status = _run(page, "sky, sun, house, grass", "into 4 classes", press_enter=True)
    assert "encoding was reused" in status
    assert set(_shares_table(page)) == {"sky", "sun", "house", "grass"}
    assert "reused" in page.locator("#lposs-timings").inner_text()

    # LPOSS instead of LPOSS+: still no re-encoding.
    page.locator("#lposs-method label", has_text="LPOSS").filter(has_not_text="+").click()
    status = _run(page, "sky, sun, grass", "into 3 classes with LPOSS (")
    assert "encoding was reused" in status

    # A bundled example: one click fills in the image and its class names.
    page.get_by_text(EXAMPLES["house.png"]).first.click()
    page.wait_for_function(
        "text => document.querySelector('#lposs-classes textarea').value === text",
        arg=EXAMPLES["house.png"],
    )
    page.locator("#lposs-run").click()
    page.get_by_text("Segmented a 320x240 image into 7 classes").wait_for()

    assert page.external_requests == []


def test_bad_inputs_show_their_message(page, tmp_path):
    # No image.
    _run(page, "sky, grass", "Error: no image")
    # No class names, and an empty synonym, with an image.
    image_path = tmp_path / "small.png"
    _scene(60, 80).save(image_path)
    _upload(page, image_path)
    _run(page, " , ", "Error: no class names")
    _run(page, "sky;, grass", "Error: empty class name or synonym in 'sky;'")
    # Too many pixels for the demo's cap: refused, with the limit named.
    big = tmp_path / "big.png"
    _scene(400, 400).save(big)
    _upload(page, big)
    status = _run(page, "sky, grass", "more than the limit")
    assert "image 'big.png' has 160,000 pixels" in status and f"{MAX_PIXELS:,}" in status
    # A file over the upload limit: Gradio refuses it and says so.
    noisy = tmp_path / "noisy.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(noisy)
    assert noisy.stat().st_size > 100_000
    _upload(page, noisy)
    page.get_by_text("exceed the maximum allowed size").first.wait_for()
    # A file that is not an image.
    fake = tmp_path / "notes.png"
    fake.write_text("these are not pixels\n")
    _upload(page, fake)
    _run(page, "sky, grass", "Error: image 'notes.png' is not an image file")
    assert page.external_requests == []


def test_backend_encodes_once_and_matches_the_segmenter(tiny_model_files, tmp_path):
    """Without a browser: new class names and the other method reuse the encoded image,
    and every result equals a full run of the library's Segmenter on the same models."""
    from lposs.demo import DemoBackend
    from lposs.methods import PRESETS
    from lposs.pipeline.segmenter import Segmenter

    clip_dir, dino_file = tiny_model_files
    presets = {name: c.replace(clip=f"local-dir:{clip_dir}", dino="vit_tiny_patch16_224",
                               short_side=112, r=5) for name, c in PRESETS.items()}
    backend = DemoBackend(presets, "lposs+", dino_weights=dino_file, max_pixels=MAX_PIXELS)
    image = tmp_path / "scene.png"
    _scene(90, 120).save(image)
    runs = [("sky, grass;lawn, house", True), ("sun, sky", True), ("sun, sky", False)]
    try:
        results = [backend.segment(image, classes, preset="dino-b16", refine=refine)
                   for classes, refine in runs]
        assert [r.encoded_reused for r in results] == [False, True, True]
        assert [r.timings["encode"] > 0 for r in results] == [True, False, False]
        reference = Segmenter.from_pretrained(presets["lposs+"], dino_weights=dino_file)
        for (classes, refine), result in zip(runs, results):
            config = presets["lposs+"].replace(pixel_stage=refine)
            expected = Segmenter(reference.clip, reference.dino, config)(image, classes)
            labels = np.array(Image.open(result.files[0]))
            np.testing.assert_array_equal(labels, expected.labels.numpy())
            counted = {name: float(np.mean(labels == i))
                       for i, name in enumerate(expected.classes)}
            assert {name: share for name, _, share in result.shares} == pytest.approx(counted)
            assert result.overlay.size[0] > 120 and result.overlay.size[1] >= 90
    finally:
        backend.close()
    assert not backend.output_dir.exists()


def test_bundled_examples_are_small_pngs():
    for name in EXAMPLES:
        path = examples_dir() / name
        assert path.stat().st_size < 50_000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.width * im.height <= 320 * 240


def test_missing_gradio_is_one_line(tmp_path):
    # A fake `gradio` package that fails to import, first on the path of a fresh process.
    (tmp_path / "gradio").mkdir()
    (tmp_path / "gradio" / "__init__.py").write_text("raise ImportError('no gradio here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(_demo_command(), capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"lposs: error: {GRADIO_MISSING}"]


def test_queue_bound_limits_on_the_page_and_a_quiet_clean_stop(tiny_model_files, tmp_path):
    """With one request allowed to wait, a burst is partly refused ("queue is full") while
    the rest are answered; the page states the limits; Gradio's share-link advice is not
    printed; SIGTERM closes the server with status 143 and nothing on stderr."""
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = _env()
    args = _demo_args(*tiny_model_files)
    args[args.index("--short-side") + 1] = "448"  # slow enough requests to pile up
    proc = subprocess.Popen(_demo_command() + ["--port", str(port), "--max-queue", "1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                with urllib.request.urlopen(url + "config", timeout=2) as response:
                    config = response.read().decode()
                    break
            except OSError:
                assert time.monotonic() < deadline, "lposs demo did not answer within 90 s"
                time.sleep(0.25)
        assert f"images up to {MAX_PIXELS / 1e6:.3g} megapixels" in config
        assert "at most 1 wait in line" in config and "uploads up to 100kb" in config

        image = tmp_path / "scene.png"
        _scene(300, 300).save(image)

        start = threading.Barrier(6)

        def ask(classes):
            client = Client(url, verbose=False)
            start.wait(timeout=60)  # every client connected: the requests come at once
            try:
                return client.predict(handle_file(str(image)), classes, "LPOSS+", "dino-b16",
                                      "", api_name="/run")[0]
            except Exception as err:  # gradio_client raises its own errors for a full queue
                return f"refused: {err}"

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, [f"sky, grass, house{i}" for i in range(6)]))
        done = [a for a in answers if a.startswith("Segmented")]
        refused = [a for a in answers if "queue is full" in a.lower()]
        assert done and refused and len(done) + len(refused) == 6, answers
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 143, err
    assert err == "", err  # no "terminate called ...", no traceback
    assert f"serving the LPOSS demo on {url}" in out and "share=True" not in out
