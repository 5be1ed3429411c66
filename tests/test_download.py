"""download: a real HTTP server on loopback serves a generated zip in nature_12K's exact layout.

The server supports Range requests (including suffix ranges), can cut a connection after K
bytes, can pretend not to know Range, and counts every body byte it sends, so the tests can
assert what crossed the wire, not just what ended up on disk.
"""

from __future__ import annotations

import errno
import io
import re
import shutil
import socket
import stat
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.data import download as dl
from inat_finetune.data import transfer
from inat_finetune.data.download import download_dataset, download_subset
from inat_finetune.data.folders import detect_layout, make_split
from inat_finetune.errors import UserError

CLASSES = [
    "Amphibia",
    "Animalia",
    "Arachnida",
    "Aves",
    "Fungi",
    "Insecta",
    "Mammalia",
    "Mollusca",
    "Plantae",
    "Reptilia",
]
TRAIN_PER_CLASS, VAL_PER_CLASS = 30, 6
TOP = "nature_12K/inaturalist_12K"
JUNK = [
    "nature_12K/.DS_Store",
    f"{TOP}/.DS_Store",
    f"{TOP}/train/.DS_Store",
    f"{TOP}/val/Aves/.DS_Store",
    "__MACOSX/nature_12K/._.DS_Store",
    f"__MACOSX/{TOP}/train/Aves/._Aves_0.jpg",
]


# -- the server ---------------------------------------------------------------------------------


class ArchiveServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.bytes_served = 0
        self.requests: list[str | None] = []  # the Range header of each GET
        self.cut_after: int | None = None  # one-shot: close the next body after this many bytes
        self.ignore_range = False
        self.lock = threading.Lock()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class RangeHandler(BaseHTTPRequestHandler):
    server: ArchiveServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        spec = self.headers.get("Range")
        with srv.lock:
            srv.requests.append(spec)
        data = srv.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        size, start, end, status = len(data), 0, len(data) - 1, 200
        if spec and not srv.ignore_range:
            first, last = re.fullmatch(r"bytes=(\d*)-(\d*)", spec).groups()
            if first == "":  # suffix range: the last N bytes
                start = max(0, size - int(last))
            else:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start : end + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"v1"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        with srv.lock:
            limit, srv.cut_after = srv.cut_after, None
            if limit is not None:
                body = body[:limit]
            srv.bytes_served += len(body)
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        if limit is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server() -> Iterator[ArchiveServer]:
    srv = ArchiveServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# -- the archive -------------------------------------------------------------------------------


def noise_jpeg(seed: int) -> bytes:
    """Incompressible, so the archive's size is real (6-18 KB an image)."""
    rng = np.random.default_rng(seed)
    side = int(rng.integers(56, 97))
    buffer = io.BytesIO()
    pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, subsampling=0)
    return buffer.getvalue()


def nature_members(
    classes: list[str] = CLASSES, train: int = TRAIN_PER_CLASS, val: int = VAL_PER_CLASS
) -> dict[str, bytes]:
    """Image members only, as in nature_12K: <TOP>/{train,val}/<Class>/<file>.jpg."""
    members = {}
    seed = 0
    for name in classes:
        for split, count in (("train", train), ("val", val)):
            for i in range(count):
                seed += 1
                members[f"{TOP}/{split}/{name}/{name}_{split}_{i}.jpg"] = noise_jpeg(seed)
    return members


def build_zip(
    images: dict[str, bytes], extra: list[tuple[zipfile.ZipInfo | str, bytes]] = ()
) -> bytes:
    """Directory entries, images, and the junk nature_12K carries (.DS_Store, __MACOSX)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        dirs = sorted(
            {"/".join(p.split("/")[:i]) + "/" for p in images for i in range(1, p.count("/") + 1)}
        )
        for d in dirs:
            zf.writestr(d, b"")
        for name, data in images.items():
            zf.writestr(name, data)
        for name in JUNK:
            zf.writestr(name, b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
        for info, data in extra:
            zf.writestr(info, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return nature_members()


@pytest.fixture(scope="module")
def archive(images: dict[str, bytes]) -> bytes:
    return build_zip(images)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root, relative path -> bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() or p.is_symlink()
    }


def serve(server: ArchiveServer, data: bytes, name: str = "nature_12K.zip") -> str:
    server.files[name] = data
    return server.url(name)


# -- full download -----------------------------------------------------------------------------


def test_full_download_gives_the_nature_tree_without_junk(server, archive, images, tmp_path):
    url = serve(server, archive)
    dest = tmp_path / "data"
    result = download_dataset(url, dest, progress=False)

    assert result.root == dest / "nature_12K"
    assert tree(dest / "nature_12K") == {
        k.removeprefix("nature_12K/"): v for k, v in images.items()
    }
    assert not list(dest.rglob(".DS_Store")) and not (dest / "__MACOSX").exists()
    assert result.skipped_members == len(JUNK) and result.files == len(images)
    # only the tree and the marker remain: no part file, no staging directory
    assert sorted(p.name for p in dest.iterdir()) == [".nature_12K.download.json", "nature_12K"]
    assert server.bytes_served == len(archive) == result.bytes_fetched
    assert detect_layout(result.root).kind == "nature12k"

    # complete: the second call is a no-op and does not touch the network
    requests = len(server.requests)
    again = download_dataset(url, dest, progress=False)
    assert again.already_complete and again.bytes_fetched == 0
    assert len(server.requests) == requests and server.bytes_served == len(archive)

    # pruning a file is the user's choice and does not trigger a new download...
    (dest / "nature_12K/inaturalist_12K/val/Fungi/Fungi_val_0.jpg").unlink()
    assert download_dataset(url, dest, progress=False).already_complete
    # ...but a removed tree does
    shutil.rmtree(dest / "nature_12K")
    restored = download_dataset(url, dest, progress=False)
    assert not restored.already_complete and server.bytes_served == 2 * len(archive)
    assert tree(dest / "nature_12K") == {
        k.removeprefix("nature_12K/"): v for k, v in images.items()
    }


def test_cut_connection_resumes_without_refetching(server, archive, images, tmp_path):
    url = serve(server, archive)
    dest = tmp_path / "data"
    chunk = 64 * 1024
    cut = len(archive) // 3
    server.cut_after = cut
    with pytest.raises(UserError, match="run the same command again to resume"):
        download_dataset(url, dest, chunk_size=chunk, retries=0, progress=False)
    part = dest / "nature_12K.zip.part"
    assert part.stat().st_size == cut == server.bytes_served
    assert not (dest / "nature_12K").exists()

    result = download_dataset(url, dest, chunk_size=chunk, retries=0, progress=False)
    assert server.requests[-1] == f"bytes={cut}-"
    assert server.bytes_served <= len(archive) + chunk
    assert result.bytes_fetched == len(archive) - cut
    assert tree(dest / "nature_12K") == {
        k.removeprefix("nature_12K/"): v for k, v in images.items()
    }
    assert not part.exists()


def test_retries_resume_within_one_call(server, archive, tmp_path):
    url = serve(server, archive)
    server.cut_after = len(archive) // 2
    result = download_dataset(
        url, tmp_path / "data", chunk_size=32 * 1024, retries=1, progress=False
    )
    assert result.files == TRAIN_PER_CLASS * len(CLASSES) + VAL_PER_CLASS * len(CLASSES)
    assert server.bytes_served == len(archive) == result.bytes_fetched
    assert len(server.requests) == 2


def test_server_ignoring_range_restarts_cleanly(server, archive, images, tmp_path):
    url = serve(server, archive)
    dest = tmp_path / "data"
    server.ignore_range = True
    server.cut_after = len(archive) // 2
    with pytest.raises(UserError, match="resume"):
        download_dataset(url, dest, retries=0, progress=False)
    result = download_dataset(url, dest, retries=0, progress=False)
    # the whole file came again and replaced the part file instead of being appended to it
    assert server.bytes_served == len(archive) // 2 + len(archive)
    assert result.bytes_fetched == len(archive)
    assert tree(dest / "nature_12K") == {
        k.removeprefix("nature_12K/"): v for k, v in images.items()
    }


def _symlink_member() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(f"{TOP}/train/Aves/link.jpg")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("mode", ["full", "subset"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_members_are_refused(server, tmp_path, kind, mode):
    outside = tmp_path / "escape.txt"
    evil = {
        "dotdot": ("nature_12K/../../escape.txt", b"pwned"),
        "absolute": (str(outside), b"pwned"),
        "symlink": (_symlink_member(), str(outside).encode()),
    }[kind]
    url = serve(server, build_zip(nature_members(CLASSES[:2], 2, 1), [evil]))
    dest = tmp_path / "data"
    with pytest.raises(UserError, match="refusing to extract"):
        if mode == "full":
            download_dataset(url, dest, progress=False)
        else:
            download_subset(url, dest, 1, 1, progress=False)
    assert not outside.exists() and not outside.is_symlink()
    assert not (dest / "nature_12K").exists()
    assert not [p for p in dest.rglob("*") if p.is_symlink()]
    assert sorted(tmp_path.iterdir()) == [dest]


def _flip_bytes_in_member(data: bytes, member: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(member)
    start = info.header_offset
    name_len = int.from_bytes(data[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(data[start + 28 : start + 30], "little")
    middle = start + 30 + name_len + extra_len + info.compress_size // 2
    corrupt = bytearray(data)
    for i in range(middle, middle + 16):
        corrupt[i] ^= 0xFF
    return bytes(corrupt)


def test_corrupt_archive_is_rejected_before_extraction(server, archive, tmp_path, monkeypatch):
    member = f"{TOP}/train/Insecta/Insecta_train_7.jpg"
    url = serve(server, _flip_bytes_in_member(archive, member))
    dest = tmp_path / "data"
    extracted = []
    monkeypatch.setattr(dl, "extract_member", lambda *args: extracted.append(args))
    with pytest.raises(UserError, match=rf"corrupt .*{member}"):
        download_dataset(url, dest, progress=False)
    assert extracted == []  # verification failed before a single member was extracted
    monkeypatch.undo()
    assert server.bytes_served == len(archive)
    # nothing extracted, no staging left, and the bad archive is gone so a rerun starts afresh
    assert list(dest.iterdir()) == []

    # the subset reads members through the same CRC check (all members chosen here)
    with pytest.raises(UserError, match="corrupt"):
        download_subset(url, dest, TRAIN_PER_CLASS, VAL_PER_CLASS, progress=False)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("mode", ["full", "subset"])
def test_archive_expanding_too_far_is_refused(server, tmp_path, mode):
    bomb = build_zip(
        nature_members(CLASSES[:2], 2, 1), [(f"{TOP}/train/Aves/zeros.jpg", bytes(8 << 20))]
    )
    url = serve(server, bomb)
    dest = tmp_path / "data"
    with pytest.raises(UserError, match="zip bomb"):
        if mode == "full":
            download_dataset(url, dest, progress=False)
        else:
            download_subset(url, dest, 1, 1, progress=False)
    assert not (dest / "nature_12K").exists()


def test_max_bytes_bounds_the_expanded_size(server, archive, tmp_path):
    url = serve(server, archive)
    with pytest.raises(UserError, match="zip bomb"):
        download_dataset(url, tmp_path / "data", max_bytes=len(archive) // 2, progress=False)


def test_foreign_directory_is_not_clobbered(server, archive, tmp_path):
    url = serve(server, archive)
    dest = tmp_path / "data"
    mine = dest / "nature_12K" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own files")
    with pytest.raises(UserError, match="not written by"):
        download_dataset(url, dest, progress=False)
    assert mine.read_text() == "my own files" and server.requests == []


# -- subset --------------------------------------------------------------------------------------


def test_subset_fetches_a_fraction_and_exact_counts(server, archive, images, tmp_path):
    url = serve(server, archive)
    dest = tmp_path / "data"
    result = download_subset(url, dest, train_per_class=3, test_per_class=2, seed=7, progress=False)

    ratio = server.bytes_served / len(archive)
    assert ratio < 0.35, f"subset fetched {ratio:.1%} of the archive"
    assert result.bytes_fetched == server.bytes_served
    # one request for the tail (central directory included) and one per chosen member
    assert len(server.requests) <= 1 + 50 + 2
    got = tree(dest / "nature_12K")
    for name in CLASSES:
        assert len([p for p in got if p.startswith(f"inaturalist_12K/train/{name}/")]) == 3
        assert len([p for p in got if p.startswith(f"inaturalist_12K/val/{name}/")]) == 2
    assert len(got) == result.files == 50
    assert all(images[f"nature_12K/{rel}"] == data for rel, data in got.items())
    # the rest of the tool takes it unchanged
    split = make_split(result.root, seed=0)
    assert split.layout == "nature12k" and split.classes == CLASSES

    # same arguments: a no-op; another seed: another choice, replacing the old subset
    served = server.bytes_served
    assert download_subset(url, dest, 3, 2, seed=7, progress=False).already_complete
    assert server.bytes_served == served
    download_subset(url, dest, 3, 2, seed=8, progress=False)
    reseeded = tree(dest / "nature_12K")
    assert len(reseeded) == 50 and set(reseeded) != set(got)

    # the full download replaces a subset it made
    full = download_dataset(url, dest, progress=False)
    assert full.files == len(images)


def test_subset_takes_all_of_a_short_class(server, tmp_path):
    url = serve(server, build_zip(nature_members(CLASSES[:2], 4, 2)))
    result = download_subset(url, tmp_path / "data", 10, 1, progress=False)
    assert result.short_classes == {
        "nature_12K/inaturalist_12K/train/Amphibia": 4,
        "nature_12K/inaturalist_12K/train/Animalia": 4,
    }
    assert result.files == 2 * 4 + 2 * 1


def test_subset_needs_range_support(server, archive, tmp_path):
    server.ignore_range = True
    url = serve(server, archive)
    with pytest.raises(UserError, match="ignores HTTP Range"):
        download_subset(url, tmp_path / "data", 3, 2, progress=False)
    assert not (tmp_path / "data" / "nature_12K").exists()


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "subset"])
def test_http_404_is_a_clear_error(server, tmp_path, mode):
    url = server.url("missing.zip")
    with pytest.raises(UserError, match=r"missing\.zip: HTTP 404"):
        if mode == "full":
            download_dataset(url, tmp_path / "data", progress=False)
        else:
            download_subset(url, tmp_path / "data", 1, 1, progress=False)


@pytest.mark.parametrize("mode", ["full", "subset"])
def test_connection_refused_is_a_clear_error(tmp_path, mode):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/nature_12K.zip"
    with pytest.raises(UserError, match="cannot reach the server .*refused"):
        if mode == "full":
            download_dataset(url, tmp_path / "data", progress=False)
        else:
            download_subset(url, tmp_path / "data", 1, 1, progress=False)


def test_not_enough_disk_space_is_refused_up_front(server, archive, tmp_path, monkeypatch):
    url = serve(server, archive)
    monkeypatch.setattr(transfer.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="free some space"):
        download_dataset(url, tmp_path / "data", progress=False)


def test_disk_full_while_writing_is_a_clear_error(server, archive, tmp_path, monkeypatch):
    url = serve(server, archive)

    class FullDisk(io.BytesIO):
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transfer, "open", lambda *a, **k: FullDisk(), raising=False)
    with pytest.raises(UserError, match="disk full while downloading"):
        download_dataset(url, tmp_path / "data", progress=False)


def test_cli_download_subset_and_errors(server, archive, tmp_path):
    url = serve(server, archive)
    dest = tmp_path / "data"
    runner = CliRunner()
    args = ["download", "--dest", str(dest), "--url", url, "--subset", "3", "--test-subset", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"ready: {dest / 'nature_12K'}" in result.output and "50 files" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already complete" in again.output

    missing = runner.invoke(app, ["download", "--dest", str(dest), "--url", server.url("nope.zip")])
    assert missing.exit_code == 2 and "HTTP 404" in missing.output
    lonely = runner.invoke(app, ["download", "--dest", str(dest), "--test-subset", "2"])
    assert lonely.exit_code == 2 and "--test-subset needs --subset" in lonely.output
