"""A Multiface release built from a synthetic entity and served on 127.0.0.1, with fault switches.

:func:`build_release` lays out ``<release root>/<ENTITY_ID>/`` as the real download server does
(reference section 2.2): ``index.html`` linking every file by absolute URL, ``CHECKSUM`` in
``md5sum`` format, ``metadata.tar``, ``audio.tar`` and per expression ``images--<EXP>.tar`` (or
one ``images--<EXP>_cam<CAM>.tar`` per camera), ``unwrapped_uv_1024--<EXP>.tar`` and
``tracked_mesh--<EXP>.tar``. Members start with the entity folder, ``m--...--GHS/``, because the
seed untars into the destination folder and the entity appears there.

:class:`ReleaseServer` serves a folder over HTTP/1.1 with ``Range`` and ``If-Range`` (strong
ETag), records every request, and can drop a connection after N body bytes or answer an error
status, once per switch. :func:`hostile_tar` and :func:`corrupt_tar` make bad tars.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shards.layout import AUDIO_DIR, MESH_DIR, PHOTO_DIR, TEXTURE_DIR, entity_id_of

MTIME = 1_500_000_000
HOSTILE_KINDS = ("dotdot", "absolute", "symlink", "hardlink", "device", "fifo", "duplicate")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Request:
    """One request the server received; ``status`` is 0 until it is answered."""

    method: str
    name: str
    range: str | None
    if_range: str | None
    status: int = 0


def _add_tree(archive: tarfile.TarFile, entity_root: Path, folder: Path) -> None:
    """Add a folder of the entity, its sub-folders and files, as ``tar -cf`` from the parent would."""
    for path in [folder, *sorted(folder.rglob("*"))]:
        _add_path(archive, entity_root, path)


def _add_path(archive: tarfile.TarFile, entity_root: Path, path: Path) -> None:
    name = f"{entity_root.name}/{path.relative_to(entity_root).as_posix()}"
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
    if path.is_dir():
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        archive.addfile(info)
    else:
        data = path.read_bytes()
        info.size, info.mode = len(data), 0o644
        archive.addfile(info, io.BytesIO(data))


def _write_tar(path: Path, entity_root: Path, folders: list[Path] = (), files: list[Path] = ()) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for folder in folders:
            _add_tree(archive, entity_root, folder)
        for file in files:
            _add_path(archive, entity_root, file)


def tar_names(entity_root: Path, per_camera_images: tuple[str, ...] = ()) -> dict[str, list[Path]]:
    """Which entity paths go in which release tar."""
    tars: dict[str, list[Path]] = {"metadata.tar": sorted(p for p in entity_root.iterdir() if p.is_file())}
    if (entity_root / AUDIO_DIR).is_dir():
        tars["audio.tar"] = [entity_root / AUDIO_DIR]
    for prefix in (PHOTO_DIR, TEXTURE_DIR, MESH_DIR):
        for expression_dir in sorted((entity_root / prefix).iterdir()):
            expression = expression_dir.name
            if prefix == PHOTO_DIR and expression in per_camera_images:
                for camera_dir in sorted(expression_dir.iterdir()):
                    tars[f"{prefix}--{expression}_cam{camera_dir.name}.tar"] = [camera_dir]
            else:
                tars[f"{prefix}--{expression}.tar"] = [expression_dir]
    return tars


def build_release(
    entity_root: Path, release_root: Path, base_url: str, per_camera_images: tuple[str, ...] = ()
) -> Path:
    """Write the release folder of a synthetic entity and return it (``release_root/<ENTITY_ID>``).

    Args:
        entity_root: the entity folder, ``m--YYYYMMDD--HHMM--<ID>--GHS``.
        release_root: the folder the server serves.
        base_url: the server's root URL; ``index.html`` links absolute URLs under it, as S3 does.
        per_camera_images: expressions whose photos are split into one tar per camera.
    """
    folder = release_root / entity_id_of(entity_root.name)
    folder.mkdir(parents=True)
    for name, paths in tar_names(entity_root, per_camera_images).items():
        _write_tar(
            folder / name,
            entity_root,
            folders=[p for p in paths if p.is_dir()],
            files=[p for p in paths if p.is_file()],
        )
    write_checksum(folder)
    names = sorted(p.name for p in folder.iterdir() if p.name != "index.html")
    links = "\n".join(f'<li><a href="{base_url}{folder.name}/{name}">{name}</a></li>' for name in names)
    (folder / "index.html").write_text(
        f'<html><body><a href="../">Parent</a><ul>\n{links}\n<li><a href="index.html">index.html</a></li></ul></body></html>\n'
    )
    return folder


def download_config(source: Path, expressions: list[str], **changes: object) -> dict:
    """The reference download config selecting ``source``'s entity and ``expressions``, with
    image, mesh, texture and metadata tars and no audio; ``changes`` override any key."""
    config = {
        "entity": [source.name.split("--")[3]],
        "image": True,
        "mesh": True,
        "texture": True,
        "metadata": True,
        "audio": False,
        "expression": expressions,
    }
    return config | changes


def write_checksum(folder: Path) -> None:
    """Rewrite ``CHECKSUM`` with the md5 of every tar in the folder, ``md5sum`` style."""
    lines = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(folder.glob("*.tar"))]
    (folder / "CHECKSUM").write_text("\n".join(lines) + "\n")


def corrupt_tar(path: Path, offset: int = 1000) -> None:
    """Flip one byte of a served tar without touching ``CHECKSUM``."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def hostile_tar(kind: str, root_name: str, outside: Path) -> bytes:
    """A tar that starts with one good file, then holds one hostile member.

    Args:
        kind: one of :data:`HOSTILE_KINDS`.
        root_name: the entity folder name the good member lives under.
        outside: an absolute path outside the destination that no member may ever create.
    """
    buffer = io.BytesIO()

    def add(name: str, data: bytes | None = None, **fields: object) -> None:
        info = tarfile.TarInfo(name)
        info.mtime = MTIME
        for key, value in fields.items():
            setattr(info, key, value)
        if data is not None:
            info.size = len(data)
        archive.addfile(info, io.BytesIO(data) if data is not None else None)

    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        add(f"{root_name}/{MESH_DIR}/good.txt", b"a good member written before the bad one\n")
        if kind == "dotdot":
            depth = len(Path(root_name).parts) + 8
            add(f"{root_name}/{'../' * depth}{outside.as_posix().lstrip('/')}", b"escaped\n")
        elif kind == "absolute":
            add(outside.as_posix(), b"escaped\n")
        elif kind == "symlink":
            add(f"{root_name}/{MESH_DIR}/link", type=tarfile.SYMTYPE, linkname=str(outside.parent))
        elif kind == "hardlink":
            add(f"{root_name}/{MESH_DIR}/hard", type=tarfile.LNKTYPE, linkname=str(outside))
        elif kind == "device":
            add(f"{root_name}/{MESH_DIR}/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        elif kind == "fifo":
            add(f"{root_name}/{MESH_DIR}/pipe", type=tarfile.FIFOTYPE)
        elif kind == "duplicate":
            add(f"{root_name}/{MESH_DIR}/good.txt", b"a second member with the same name\n")
        else:
            raise ValueError(f"unknown hostile kind {kind!r}; use one of {HOSTILE_KINDS}")
    return buffer.getvalue()


class ReleaseServer:
    """Serve a folder on 127.0.0.1 (a free port) with Range support and fault switches.

    Use as a context manager. Switches, each used once by the next GET of that file name:
    ``drop_after[name] = N`` sends the full headers, N body bytes, then closes the connection;
    ``fail_with[name] = status`` answers that HTTP status with no body;
    ``stall_after[name] = (N, seconds)`` sends N body bytes, then nothing for that long, then closes.
    """

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[Request] = []
        self.drop_after: dict[str, int] = {}
        self.fail_with: dict[str, int] = {}
        self.stall_after: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def requests_for(self, name: str) -> list[Request]:
        with self._lock:
            return [request for request in self.requests if request.name == name]

    def __enter__(self) -> ReleaseServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler_for(server: ReleaseServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _serve(self, body: bool) -> None:
            relative = unquote(urlsplit(self.path).path).lstrip("/")
            name = relative.rsplit("/", 1)[-1]
            range_header, if_range = self.headers.get("Range"), self.headers.get("If-Range")
            path = server.root / relative
            request = Request(self.command, name, range_header, if_range)
            status = 404
            try:
                with server._lock:
                    server.requests.append(request)
                    failure = server.fail_with.pop(name, None) if body else None
                    drop = server.drop_after.pop(name, None) if body else None
                    stall = server.stall_after.pop(name, None) if body else None
                if stall is not None:
                    drop = stall[0]
                if failure is not None:
                    status = failure
                    return self._reply(status, {})
                if ".." in relative.split("/") or not path.is_file():
                    return self._reply(404, {}, b"not found\n")
                data = path.read_bytes()
                etag = f'"{hashlib.md5(data).hexdigest()}"'
                headers = {"ETag": etag, "Accept-Ranges": "bytes"}
                start, end, status = 0, len(data), 200
                match = _RANGE_RE.match(range_header or "")
                if match and (if_range is None or if_range == etag):
                    start = int(match[1])
                    end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
                    if start >= len(data):
                        status = 416
                        return self._reply(416, {"Content-Range": f"bytes */{len(data)}"})
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
                payload = data[start:end]
                if drop is None:
                    return self._reply(status, headers, payload)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[:drop])
                self.wfile.flush()
                if stall is not None:
                    time.sleep(stall[1])
                self.close_connection = True
            finally:
                request.status = status

    return Handler
