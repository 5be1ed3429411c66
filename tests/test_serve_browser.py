"""The web page, driven by a real headless Chromium, and the JSON API it calls.

The checkpoint is mobilenet_v2 with its real ImageNet features and a 5-class head cut from its
ImageNet head (ant, bee, ladybug, monarch, garden spider), so it recognises the hymenoptera
photos without training and the page has five bars to draw.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import HYMENOPTERA, ModuleTempFactory, require_shared, write_tall_png
from fastapi.testclient import TestClient
from torch import nn
from typer.testing import CliRunner

from inat_finetune.cli.main import app as cli_app
from inat_finetune.inference import serve as serve_module
from inat_finetune.inference.predict import Predictor, predict_paths
from inat_finetune.inference.serve import create_app, is_loopback
from inat_finetune.models.backbones import get_model
from inat_finetune.models.checkpoints import CARD_KEY

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
ENSURE_BROWSER = Path(__file__).resolve().parents[1] / "scripts" / "ensure_browser.sh"
SCREENSHOT_COPY = Path("/tmp/serve_screenshot.png")
# Our class name -> the ImageNet category whose head row it takes.
INSECTS = {
    "ants": "ant",
    "bees": "bee",
    "ladybugs": "ladybug",
    "butterflies": "monarch",
    "spiders": "garden spider",
}
MAX_UPLOAD_MB = 1.0


def write_insect_checkpoint(path: Path) -> Path:
    built = get_model("mobilenet_v2", weights="DEFAULT")
    rows = [built.imagenet_categories.index(v) for v in INSECTS.values()]
    old = built.model.get_submodule(built.head)
    head = nn.Linear(old.in_features, len(rows))
    with torch.no_grad():
        head.weight.copy_(old.weight[rows])
        head.bias.copy_(old.bias[rows])
    built.model.set_submodule(built.head, head)
    card = {
        "backbone": "mobilenet_v2",
        "source_weights": built.weights,
        "class_names": list(INSECTS),
        "head": built.head,
        "preprocessing": built.preprocessing.to_dict(),
        "strategy": "none",
    }
    state = {f"model.{k}": v for k, v in built.model.state_dict().items()}
    torch.save({"state_dict": state, CARD_KEY: card}, path)
    return path


@pytest.fixture(scope="module")
def predictor(module_tmp_factory: ModuleTempFactory) -> Predictor:
    return Predictor.from_checkpoint(
        write_insect_checkpoint(module_tmp_factory.mktemp("serve") / "insects.ckpt")
    )


def pick_photo(predictor: Predictor, folder: Path) -> tuple[Path, str]:
    """The first photo of ``folder`` whose top class wins clearly, and that class."""
    for photo in sorted(require_shared(folder).iterdir()):
        top = predict_paths(predictor, [photo], progress=False).predictions[0].top
        if top[0][1] - top[1][1] > 0.05:  # no coin flip that float noise could turn over
            return photo, top[0][0]
    raise AssertionError(f"{folder}: no photo with a clear prediction")


@pytest.fixture(scope="module")
def ant_photo(predictor: Predictor) -> tuple[Path, str]:
    return pick_photo(predictor, HYMENOPTERA / "val" / "ants")


@pytest.fixture(scope="module")
def bee_photo(predictor: Predictor) -> tuple[Path, str]:
    return pick_photo(predictor, HYMENOPTERA / "val" / "bees")


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> TestClient:
    return TestClient(create_app(predictor, max_upload_mb=MAX_UPLOAD_MB, max_megapixels=40))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- the JSON API --------------------------------------------------------------------------


def test_api_predicts_like_predict_paths(
    client: TestClient, predictor: Predictor, ant_photo
) -> None:
    photo, expected = ant_photo
    response = client.post("/api/predict", files={"file": (photo.name, photo.read_bytes())})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["path"] == photo.name  # predict --json's shape for one image
    assert data["predictions"][0]["label"] == expected == "ants"
    assert [t["label"] for t in data["predictions"]] == [
        t.label for t in predict_paths(predictor, [photo], progress=False).predictions[0].top
    ]
    assert len(data["predictions"]) == 5
    assert sum(t["score"] for t in data["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert data["width"] > 0 and data["height"] > 0


def test_api_refuses_non_images(client: TestClient) -> None:
    response = client.post("/api/predict", files={"file": ("notes.txt", b"just some text")})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("not an image: notes.txt")
    empty = client.post("/api/predict", files={"file": ("empty.jpg", b"")})
    assert empty.status_code == 400
    assert empty.json()["detail"] == "not an image: empty.jpg is empty"


def test_api_refuses_oversized_uploads(client: TestClient) -> None:
    big = b"\xff\xd8" + b"\x00" * int(1.2e6)
    response = client.post("/api/predict", files={"file": ("big.jpg", big)})
    assert response.status_code == 413
    assert response.json()["detail"].startswith("file too large:")
    assert "the limit is 1 MB (--max-upload-mb)" in response.json()["detail"]

    # Without a Content-Length (chunked upload) the body is counted as it arrives.
    boundary = "xyz"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    chunked = client.post(
        "/api/predict",
        content=chunks,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert chunked.status_code == 413
    assert chunked.json()["detail"].startswith("file too large:")

    # Just under the limit goes through to the image check.
    fits = client.post("/api/predict", files={"file": ("ok.jpg", big[: int(0.9e6)])})
    assert fits.status_code == 400


def test_api_refuses_decompression_bombs_before_decoding(client: TestClient) -> None:
    # 64 Mpx: under Pillow's own bomb limit, over the app's 40 Mpx.
    response = client.post("/api/predict", files={"file": ("wide.png", png_header(8000, 8000))})
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "image too large: wide.png is 8000 x 8000 = 64,000,000 pixels; "
        "the limit is 40,000,000 (--max-megapixels)"
    )
    # 400 Mpx: Pillow itself refuses to open it.
    huge = client.post("/api/predict", files={"file": ("huge.png", png_header(20000, 20000))})
    assert huge.status_code == 413
    assert huge.json()["detail"].startswith("image too large: huge.png")


TALL_REFUSAL = (
    "image refused: tall.png is over the image memory budget (4 x 20,000,000 px is 1:5,000,000; "
    "the limit is 1:50 long side to short side, which keeps resizing it under 1 GiB)"
)


@pytest.fixture(scope="module")
def tall_pngs(module_tmp_factory: ModuleTempFactory) -> dict[str, bytes]:
    """146 KB and 73 KB PNGs of 4 x 20,000,000 and 4 x 10,000,000 px (the second is within
    the 40-megapixel limit): resized to 232 px they would take hundreds of GB."""
    folder = module_tmp_factory.mktemp("tall")
    return {
        "tall.png": write_tall_png(folder / "tall.png", 4, 20_000_000).read_bytes(),
        "within_pixels.png": write_tall_png(folder / "w.png", 4, 10_000_000).read_bytes(),
    }


def test_api_refuses_too_tall_images_with_422(client: TestClient, tall_pngs) -> None:
    response = client.post("/api/predict", files={"file": ("tall.png", tall_pngs["tall.png"])})
    assert response.status_code == 422
    assert response.json() == {"detail": TALL_REFUSAL}
    data = tall_pngs["within_pixels.png"]
    within = client.post("/api/predict", files={"file": ("within_pixels.png", data)})
    assert within.status_code == 422
    assert within.json()["detail"].startswith(
        "image refused: within_pixels.png is over the image memory budget (4 x 10,000,000 px"
    )


def test_uploads_are_decoded_a_bounded_number_at_a_time(
    predictor: Predictor, ant_photo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight uploads at once: at most two (serve.DECODE_SLOTS) decode together; all answered."""
    active, most = 0, 0
    count = threading.Lock()
    real_load = predictor.load_uint8  # serve decodes to uint8; the device normalises

    def slow_load(source, tta="none"):
        nonlocal active, most
        with count:
            active += 1
            most = max(most, active)
        try:
            time.sleep(0.3)  # long enough for the other requests to arrive meanwhile
            return real_load(source, tta)
        finally:
            with count:
                active -= 1

    monkeypatch.setattr(predictor, "load_uint8", slow_load)
    client = TestClient(create_app(predictor, max_upload_mb=MAX_UPLOAD_MB))
    photo = ant_photo[0].read_bytes()

    def upload(_: int) -> int:
        return client.post("/api/predict", files={"file": ("a.jpg", photo)}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(upload, range(8)))
    assert codes == [200] * 8
    assert most == 2  # reached (requests did overlap), never passed


def test_page_is_self_contained(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert '<input id="file" type="file"' in page.text
    # No CDN, web font or external script: the page must work without internet.
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


# --- the command line's serve ------------------------------------------------------------


def test_cli_serve_binds_to_loopback_by_default_and_warns_otherwise(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the command itself: the socket it hands to uvicorn, with uvicorn stubbed out."""
    bound: list[tuple[str, int]] = []

    def record(app, sock: socket.socket) -> None:
        bound.append(sock.getsockname()[:2])
        sock.close()

    monkeypatch.setattr(serve_module, "run_server", record)
    runner = CliRunner()
    default = runner.invoke(cli_app, ["serve", predictor.checkpoint, "--port", "0"])
    assert default.exit_code == 0, default.output
    host, port = bound[0]
    assert host == "127.0.0.1" and port > 0
    assert f"serving on http://127.0.0.1:{port}/" in default.output
    assert "warning" not in default.output

    exposed = runner.invoke(
        cli_app, ["serve", predictor.checkpoint, "--host", "0.0.0.0", "--port", "0"]
    )
    assert exposed.exit_code == 0, exposed.output
    assert bound[1][0] == "0.0.0.0"
    assert "warning: --host 0.0.0.0 is not loopback" in exposed.output


def test_cli_serve_refuses_an_invalid_or_busy_port_in_one_line(predictor: Predictor) -> None:
    runner = CliRunner()
    invalid = runner.invoke(cli_app, ["serve", predictor.checkpoint, "--port", "99999"])
    assert invalid.exit_code == 2
    assert invalid.output.strip() == (
        "error: --port 99999: not a TCP port; pass 1 to 65535 (0: any free port)"
    )
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        busy = runner.invoke(cli_app, ["serve", predictor.checkpoint, "--port", str(port)])
    assert busy.exit_code == 2
    assert busy.output.strip() == (
        f"error: --port {port}: 127.0.0.1:{port} is already in use by another program; "
        "stop it or pass another --port"
    )


# --- the page in a real browser ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(
    predictor: Predictor, module_tmp_factory: ModuleTempFactory
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``inat-finetune serve`` itself, in a subprocess on a free loopback port."""
    port = free_port()
    log = module_tmp_factory.mktemp("server") / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "inat_finetune", "serve", predictor.checkpoint,
             "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_MB)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"serve exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"serve did not start: {log.read_text()}"
        try:
            with urllib.request.urlopen(url + "api/info", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    yield url, process
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def server_url(server: tuple[str, subprocess.Popen]) -> str:
    return server[0]


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def post_file(url: str, name: str, data: bytes) -> tuple[int, dict]:
    boundary = "tallimageboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_refuses_too_tall_images_without_using_memory(server, tall_pngs) -> None:
    """The issue's measure, on the real server process: its peak resident memory (VmHWM, reset
    through clear_refs) stays under 200 MB above its idle size while it answers 422."""
    url, process = server
    clear_refs = Path(f"/proc/{process.pid}/clear_refs")
    for name, data in tall_pngs.items():
        try:
            clear_refs.write_text("5")  # the peak starts again from the current size
        except OSError as exc:
            pytest.skip(f"cannot reset the peak memory of the server ({exc})")
        idle = memory_kib(process.pid, "VmRSS")
        status, body = post_file(url + "api/predict", name, data)
        grown = memory_kib(process.pid, "VmHWM") - idle
        assert status == 422, body
        assert "the limit is 1:50" in body["detail"]
        assert grown < 200 * 1024, f"{name}: peak {grown / 1024:.0f} MB above idle"


@pytest.fixture(scope="module")
def browser(module_tmp_factory: ModuleTempFactory) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # `make test` installs them (scripts/ensure_browser.sh); where it could not, the same line.
    check = subprocess.run(
        ["bash", str(ENSURE_BROWSER), "--check"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        pytest.fail(check.stdout.strip(), pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1000,720",
        f"--user-data-dir={module_tmp_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for_state(driver, states: tuple[str, ...], timeout: float = 30) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.state") in states
    )
    return driver.execute_script("return document.body.dataset.state")


def shown_classes(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [
        li.get_attribute("data-class")
        for li in driver.find_elements(By.CSS_SELECTOR, "#results .prediction")
    ]


def test_browser_upload_shows_the_top_class(browser, server_url, ant_photo, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    photo, expected = ant_photo
    browser.get(server_url)
    assert wait_for_state(browser, ("ready",)) == "ready"
    browser.find_element(By.ID, "file").send_keys(str(photo))
    assert wait_for_state(browser, ("done", "error")) == "done"

    classes = shown_classes(browser)
    assert classes[0] == expected
    assert sorted(classes) == sorted(INSECTS)  # five bars
    first = browser.find_element(By.CSS_SELECTOR, "#results .prediction .label")
    assert first.text == expected and first.is_displayed()
    widths = browser.execute_script(
        "return [...document.querySelectorAll('#results .bar')].map(b => b.offsetWidth)"
    )
    assert widths[0] > widths[-1] >= 0 and widths[0] > 100  # bars drawn to scale
    # The photo itself is shown next to the bars.
    preview = browser.find_element(By.ID, "preview")
    browser.execute_script(
        "return new Promise(r => { const i = arguments[0]; i.complete ? r() : i.onload = r; })",
        preview,
    )
    assert preview.is_displayed()
    assert browser.execute_script("return arguments[0].naturalWidth", preview) > 0

    shot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    shutil.copyfile(shot, SCREENSHOT_COPY)


def test_browser_drop_shows_the_top_class(browser, server_url, bee_photo) -> None:
    photo, expected = bee_photo
    browser.get(server_url)
    wait_for_state(browser, ("ready",))
    # A drop as the browser delivers it: a DataTransfer holding the file, dispatched on the zone.
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], arguments[1], { type: "image/jpeg" }));
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        """,
        base64.b64encode(photo.read_bytes()).decode(),
        photo.name,
    )
    assert wait_for_state(browser, ("done", "error")) == "done"
    assert shown_classes(browser)[0] == expected


def test_browser_non_image_shows_the_error(browser, server_url, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a photo")
    browser.get(server_url)
    wait_for_state(browser, ("ready",))
    browser.find_element(By.ID, "file").send_keys(str(notes))
    assert wait_for_state(browser, ("done", "error")) == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.text.startswith("not an image: notes.txt")
    assert shown_classes(browser) == []
    assert not browser.find_element(By.ID, "preview").is_displayed()


def test_browser_oversized_upload_is_refused(browser, server_url, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + b"\x00" * int(1.5e6))
    browser.get(server_url)
    wait_for_state(browser, ("ready",))
    browser.find_element(By.ID, "file").send_keys(str(big))
    assert wait_for_state(browser, ("done", "error")) == "error"
    message = browser.find_element(By.ID, "error").text
    assert message == "file too large: 1.50 MB; the limit is 1 MB (--max-upload-mb)"
    # The server refuses it as well when a page (or program) sends it anyway.
    status, detail = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const body = new FormData();
        body.append("file", new Blob([new Uint8Array(1500000)]), "big.jpg");
        fetch("api/predict", { method: "POST", body })
            .then(async r => done([r.status, (await r.json()).detail]))
            .catch(e => done([0, String(e)]));
        """
    )
    assert status == 413, detail
    assert detail.startswith("file too large:")


def test_cli_serve_reports_a_bad_checkpoint(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from inat_finetune.cli.main import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing.ckpt"), "--port", "0"])
    assert result.exit_code == 2
    assert "missing.ckpt: no such checkpoint file or run directory" in result.output
