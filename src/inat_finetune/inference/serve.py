"""A small web app to try a checkpoint: drop a photo on a page, see the top-5 classes.

``GET /`` is one self-contained HTML page (no external scripts, fonts or styles: it works
offline). ``POST /api/predict`` takes a multipart upload named ``file`` and answers JSON in the
shape ``predict --json`` gives each image: ``{"path": <the upload's file name>, "predictions":
[{"label", "score"}, ...], "width", "height"}``, with the server's ``--tta``; errors are
``{"detail": "..."}`` with 400 (not an image), 413 (too many bytes or too many pixels) or 422
(an image that would exceed the memory budget, ``data.memory_refusal``: more elongated than
1:50, or over 1 GiB decoded or resized to the model's size).

Uploads are untrusted: the body size is capped before it is read, and the pixel count, aspect
ratio and memory needs are read from the image header and checked before anything is decoded,
so a small file that expands to gigapixels (a decompression bomb) or to gigabytes once resized
(a 4 x 20,000,000 px PNG of 146 KB) is refused without allocating it. At most
``DECODE_SLOTS`` uploads are decoded at once, so concurrent requests cannot multiply the
memory one decode may take (a ``--max-megapixels`` 40 image: about 320 MB).

``bind`` opens the listening socket before anything is announced: an invalid or busy
``--port`` is one line naming it, never a server that says "serving on" and then exits.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError

from inat_finetune.data.images import ImageRefused, memory_refusal
from inat_finetune.data.tta import tta_mode
from inat_finetune.errors import UserError
from inat_finetune.inference.predict import Predictor

DEFAULT_MAX_UPLOAD_MB = 10.0


DEFAULT_MAX_MEGAPIXELS = 40.0


# Room for the multipart boundary and part headers around the file itself.
MULTIPART_OVERHEAD = 64 * 1024


# Uploads decoded at once; the others wait. Inference itself runs one at a time.
DECODE_SLOTS = 2


MAX_PORT = 65535


def _mb(n: float) -> str:
    return f"{n / 1e6:.3g} MB"


class _BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes before reading them.

    A declared Content-Length over the limit is answered at once; a chunked body is counted
    as it arrives and stopped when it passes the limit.
    """

    def __init__(self, app: Any, limit: int, message: str) -> None:
        self.app = app
        self.limit = limit
        self.message = message

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send, int(length))
            return
        received = 0

        async def counted_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI passes HTTPExceptions raised while reading the body through.
                    raise HTTPException(413, self.message.format(size="over " + _mb(self.limit)))
            return message

        await self.app(scope, counted_receive, send)

    async def _refuse(self, send: Any, size: int) -> None:
        import json

        body = json.dumps({"detail": self.message.format(size=_mb(size))}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def check_upload(
    data: bytes, filename: str, max_pixels: int, target: int | None = None
) -> tuple[int, int]:
    """Width and height of an uploaded image, read from its header; refuse non-images, bombs
    and images whose decode or resize to ``target`` px would exceed the memory budget."""
    if not data:
        raise HTTPException(400, f"not an image: {filename} is empty")
    try:
        # Image.open reads the header only; pixels are decoded later, after the size check.
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:
        # Pillow's own limit (twice MAX_IMAGE_PIXELS) can trip before ours on open.
        raise HTTPException(
            413, f"image too large: {filename} is over {max_pixels:,} pixels"
        ) from None
    except UnidentifiedImageError:
        raise HTTPException(
            400, f"not an image: {filename} is not a photo format (use JPEG, PNG, WebP, ...)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise HTTPException(400, f"not an image: {filename} has a broken header ({exc})") from None
    reason = memory_refusal((width, height), target)
    if reason is not None:
        raise HTTPException(422, f"image refused: {filename} is {reason}")
    if width * height > max_pixels:
        raise HTTPException(
            413,
            f"image too large: {filename} is {width} x {height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,} (--max-megapixels)",
        )
    return width, height


def create_app(
    ckpt: str | Path | Predictor,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    top_k: int = 5,
    tta: str = "none",
    device: str = "cpu",
) -> FastAPI:
    """The FastAPI app for one checkpoint, loaded once (on ``device`` unless a ``Predictor``
    is given); every answer averaged over the views of ``tta`` (none, flip, multicrop)."""
    mode = tta_mode(tta)
    if isinstance(ckpt, Predictor):
        predictor = ckpt
    else:
        predictor = Predictor.from_checkpoint(ckpt, device=device)
    max_bytes = int(max_upload_mb * 1e6)
    max_pixels = int(max_megapixels * 1e6)
    too_large = f"file too large: {{size}}; the limit is {_mb(max_bytes)} (--max-upload-mb)"
    # One inference at a time: torch already uses every core for a single image.
    lock = threading.Lock()
    decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
    target = predictor.preprocessing.resize_size

    app = FastAPI(title="inat-finetune", docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, limit=max_bytes + MULTIPART_OVERHEAD, message=too_large)
    page = _page(predictor, max_bytes, top_k)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "backbone": predictor.card["backbone"],
            "class_names": predictor.class_names,
            "max_upload_bytes": max_bytes,
            "max_pixels": max_pixels,
        }

    # A plain def: FastAPI runs it in a worker thread, keeping the event loop free.
    @app.post("/api/predict")
    def api_predict(file: UploadFile = File(...)) -> dict[str, Any]:
        name = file.filename or "upload"
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, too_large.format(size="over " + _mb(max_bytes)))
        width, height = check_upload(data, name, max_pixels, target)
        with decode_slots:
            batch = _decode(predictor, data, name, mode)
        with lock:
            top = predictor.top(predictor.logits(batch, mode), top_k)[0]
        return {
            "path": name,
            "predictions": [t._asdict() for t in top],
            "width": width,
            "height": height,
        }

    return app


def _decode(predictor: Predictor, data: bytes, name: str, tta: str) -> Any:
    """The upload as a uint8 batch of one; a refusal is 422, a decode failure 400, never 500."""
    try:
        return predictor.load_uint8(io.BytesIO(data), tta).unsqueeze(0)
    except ImageRefused as exc:
        raise HTTPException(422, f"image refused: {name} is {exc.reason}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise HTTPException(400, f"not an image: {name} could not be decoded ({exc})") from None
    except (RuntimeError, MemoryError) as exc:  # torch's failed allocations are RuntimeErrors
        raise HTTPException(
            422, f"image refused: {name} could not be processed ({type(exc).__name__})"
        ) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(port: int) -> None:
    """Refuse a ``--port`` outside TCP's range (0 asks the system for any free port)."""
    if not 0 <= port <= MAX_PORT:
        raise UserError(f"--port {port}: not a TCP port; pass 1 to {MAX_PORT} (0: any free port)")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, ready for uvicorn; UserError naming the option if
    the port is invalid or taken or the host is not an address of this machine."""
    check_port(port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(
            f"--host {host}: not an address this machine can bind ({exc}); "
            "pass 127.0.0.1, or 0.0.0.0 for every interface"
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn sets it: a restart is not refused while old connections linger.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(_bind_failure(host, port, exc)) from None
    return sock


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    import errno

    if exc.errno == errno.EADDRINUSE:
        return (
            f"--port {port}: {host}:{port} is already in use by another program; "
            "stop it or pass another --port"
        )
    if exc.errno == errno.EACCES:
        return f"--port {port}: permission denied (ports below 1024 need root); pass --port 7860"
    return (
        f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
        "pass --host 127.0.0.1 and a free --port"
    )


def run_server(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` on the already bound ``sock`` with uvicorn until interrupted."""
    import uvicorn

    host, port = sock.getsockname()[:2]  # for uvicorn's "running on" line; the socket decides
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    server.run(sockets=[sock])


def _page(predictor: Predictor, max_bytes: int, top_k: int) -> str:
    import html
    import json

    config = json.dumps({"maxBytes": max_bytes, "maxMB": _mb(max_bytes)})
    classes = ", ".join(predictor.class_names)
    title = f"{predictor.card['backbone']}: {len(predictor.class_names)} classes"
    return (
        PAGE.replace("__TITLE__", html.escape(title))
        .replace("__CLASSES__", html.escape(classes))
        .replace("__TOPK__", str(min(top_k, len(predictor.class_names))))
        .replace("__CONFIG__", config)
    )


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>inat-finetune: __TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f4f6f3; color: #1d2b1f; }
  main { max-width: 760px; margin: 0 auto; padding: 24px; }
  h1 { font-size: 1.4rem; margin: 0 0 4px; }
  .sub { color: #5a6b5c; margin: 0 0 16px; font-size: .9rem; }
  #drop { display: block; border: 2px dashed #7c9a80; border-radius: 12px; padding: 28px;
          text-align: center; background: #fff; cursor: pointer; }
  #drop.over { background: #e4f0e4; border-color: #2f6b36; }
  #drop input { margin-top: 10px; }
  #out { display: flex; gap: 24px; margin-top: 20px; align-items: flex-start; flex-wrap: wrap; }
  #preview { max-width: 320px; max-height: 320px; border-radius: 8px; display: none;
             box-shadow: 0 1px 4px rgba(0,0,0,.2); }
  #results { flex: 1; min-width: 260px; list-style: none; padding: 0; margin: 0; }
  .prediction { margin: 0 0 10px; }
  .prediction .name { display: flex; justify-content: space-between; font-size: .95rem; }
  .prediction:first-child .name { font-weight: 700; }
  .track { background: #dde5dd; border-radius: 4px; height: 14px; overflow: hidden; }
  .bar { background: #3f8a48; height: 100%; }
  #status { color: #5a6b5c; margin-top: 12px; min-height: 1.2em; }
  #error { color: #a11d1d; background: #fdeaea; border-radius: 8px; padding: 10px 14px;
           margin-top: 12px; display: none; }
</style>
</head>
<body>
<main>
  <h1>__TITLE__</h1>
  <p class="sub">Classes: __CLASSES__. Top __TOPK__ shown.</p>
  <label id="drop" for="file">
    <strong>Drop a photo here</strong> or choose one<br>
    <input id="file" type="file" accept="image/*">
  </label>
  <div id="status"></div>
  <div id="error" role="alert"></div>
  <div id="out">
    <img id="preview" alt="uploaded photo">
    <ol id="results"></ol>
  </div>
</main>
<script>
const CONFIG = __CONFIG__;
const drop = document.getElementById("drop");
const input = document.getElementById("file");
const preview = document.getElementById("preview");
const results = document.getElementById("results");
const statusLine = document.getElementById("status");
const errorBox = document.getElementById("error");
let previewUrl = null;

function showError(message) {
  errorBox.textContent = message;
  errorBox.style.display = "block";
  statusLine.textContent = "";
  document.body.dataset.state = "error";
}

function showResults(data) {
  results.replaceChildren();
  for (const item of data.predictions) {
    const li = document.createElement("li");
    li.className = "prediction";
    li.dataset.class = item.label;
    const pct = (100 * item.score).toFixed(1);
    const name = document.createElement("div");
    name.className = "name";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = item.label;
    const value = document.createElement("span");
    value.textContent = pct + "%";
    name.append(label, value);
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = pct + "%";
    track.append(bar);
    li.append(name, track);
    results.append(li);
  }
  statusLine.textContent = data.path + " (" + data.width + " x " + data.height + ")";
  document.body.dataset.state = "done";
}

async function classify(file) {
  results.replaceChildren();
  errorBox.style.display = "none";
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  preview.style.display = "none";
  document.body.dataset.state = "busy";
  statusLine.textContent = "Classifying " + file.name + "...";
  if (file.size > CONFIG.maxBytes) {
    // The server refuses it too; saying so here spares the upload.
    showError("file too large: " + (file.size / 1e6).toPrecision(3) + " MB; the limit is " +
              CONFIG.maxMB + " (--max-upload-mb)");
    return;
  }
  previewUrl = URL.createObjectURL(file);
  preview.onload = () => { preview.style.display = "block"; };
  preview.src = previewUrl;
  const body = new FormData();
  body.append("file", file, file.name);
  try {
    const response = await fetch("api/predict", { method: "POST", body });
    const data = await response.json().catch(() => ({ detail: response.statusText }));
    if (!response.ok) {
      preview.style.display = "none";
      showError(data.detail || ("error " + response.status));
      return;
    }
    showResults(data);
  } catch (err) {
    showError("could not reach the server: " + err);
  }
}

input.addEventListener("change", () => { if (input.files.length) classify(input.files[0]); });
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
document.body.dataset.state = "ready";
</script>
</body>
</html>
"""
