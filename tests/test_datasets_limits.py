"""What an upload may unpack to and what it may keep: the expansion ratio and the
total unpacked bytes, checked on the sizes the archive declares before anything is
extracted and on the bytes really written; files that do not decode never reach the
published dataset; a refused upload leaves nothing behind and the datasets already
there intact. Unit tests over `Datasets`, then the same through a real server."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import tarfile
import zipfile

import grpc
import pytest

import tlserve.client as tlclient
from tlserve.service.datasets import MAX_EXPANSION_RATIO, Datasets, archive
from tlserve.service.datasets import upload as upload_module
from tlserve.service.errors import InvalidArgument
from tlserve.service.training.synthetic import write_image_folder
from tests.serverproc import ServerProcess
from tests.test_datasets import CLASSES, W, png_bytes, upload

# Far past MAX_EXPANSION_RATIO once deflated (zeros deflate about 1000:1), yet
# small enough to write in a blink if a fault let it through.
BOMB_BYTES = 8 << 20


# --- helpers -----------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    """2 classes x 5 images of 16 px."""
    return write_image_folder(tmp_path / "src", CLASSES, 5, size=16, seed=1)


@pytest.fixture
def ds(make_datasets, folder):
    """Datasets holding one earlier upload, "kept", that no refusal may touch."""
    ds = make_datasets()
    upload(ds, zip_of(folder), name="kept")
    return ds


def zip_of(folder: pathlib.Path, extra: dict[str, bytes] | None = None) -> bytes:
    """The folder's images and `extra` entries, deflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, p.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_of(folder: pathlib.Path, extra: dict[str, bytes] | None = None, mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for p in sorted(folder.rglob("*.png")):
            tf.add(p, p.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sparse_member(name: str, real_size: int) -> bytes:
    """An old-GNU sparse tar member: its header's size field says 512 bytes (what is
    stored), its sparse map says the file is `real_size` bytes, the rest holes that
    read as zeros. tarfile writes no sparse files, so the header is patched by hand."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))

    def field(n: int) -> bytes:  # a 12-byte number field of the header
        return tarfile.itn(n, 12, tarfile.GNU_FORMAT)

    header[386:410] = field(0) + field(512)  # the sparse map: one data region, bytes 0…511
    header[483:495] = field(real_size)
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + b"\x89PNG".ljust(512, b"\0")


def tree(ds: Datasets) -> dict[str, str]:
    """Every file under HOME/datasets with its sha256, and every folder."""
    root = ds.settings.datasets_dir
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in root.rglob("*")}


def refused(ds: Datasets, data: bytes, words: str) -> InvalidArgument:
    """Uploads `data`, expects InvalidArgument matching `words`, and checks that
    nothing changed on disk or in the store."""
    before, rows = tree(ds), ds.store.query("SELECT id, name, proto FROM datasets")
    with pytest.raises(InvalidArgument, match=words) as e:
        upload(ds, data, name="new")
    assert tree(ds) == before
    assert ds.store.query("SELECT id, name, proto FROM datasets") == rows
    assert list(ds.uploads_dir.iterdir()) == []
    return e.value


@pytest.fixture
def no_extraction(monkeypatch):
    """Fails the test if anything is extracted."""
    def extract(*args, **kwargs):
        raise AssertionError("the archive was extracted; it should have been refused from its entry list")
    monkeypatch.setattr(archive._Archive, "extract", extract)


RATIO_WORDS = rf"over the limit of {MAX_EXPANSION_RATIO} unpacked bytes per archive byte"


# --- the expansion ratio and the total -------------------------------------------------


def test_a_zip_that_inflates_past_the_ratio_is_refused_before_extracting(ds, folder, no_extraction):
    data = zip_of(folder, {"star/bomb.png": b"\0" * BOMB_BYTES})
    assert len(data) * MAX_EXPANSION_RATIO < BOMB_BYTES < ds.settings.max_upload_bytes
    error = refused(ds, data, RATIO_WORDS)
    assert f"{MAX_EXPANSION_RATIO} x its {len(data)} bytes" in str(error)


def test_a_tar_gz_that_inflates_past_the_ratio_is_refused_before_extracting(ds, folder, no_extraction):
    data = tar_of(folder, {"diamond/bomb.png": b"\0" * BOMB_BYTES}, mode="w:gz")
    assert len(data) * MAX_EXPANSION_RATIO < BOMB_BYTES
    refused(ds, data, RATIO_WORDS)


def test_a_tar_header_whose_size_field_understates_the_file_is_refused_before_extracting(ds, folder, no_extraction):
    # The size field says 512 bytes; the sparse map says 8 MiB, which is what extraction writes.
    data = sparse_member("star/sparse.png", BOMB_BYTES) + tar_of(folder)
    assert len(data) * MAX_EXPANSION_RATIO < BOMB_BYTES
    refused(ds, data, RATIO_WORDS)


def test_an_entry_that_writes_more_than_its_header_declared_is_stopped_and_leaves_nothing(ds, folder, monkeypatch):
    # Python's zipfile and tarfile stop at the declared size; extraction must not rely on
    # that. Swapping the archive between the scan and the extraction makes the bytes
    # extracted disagree with the sizes the scan checked, as a lying header would.
    small = zip_of(folder, {"star/x.png": png_bytes()})
    large = zip_of(folder, {"star/x.png": b"\0" * (2 << 20)})
    plan = upload_module.plan_layout

    def plan_then_swap(*args):
        (part,) = ds.uploads_dir.glob("*.part")
        part.write_bytes(large)
        return plan(*args)

    monkeypatch.setattr(upload_module, "plan_layout", plan_then_swap)
    refused(ds, small, rf"archive entry 'star/x.png' unpacks to more than the {len(png_bytes())} bytes its header "
                       "declares")


def test_the_total_is_capped_at_a_multiple_of_max_upload_bytes_within_the_ratio(make_datasets, folder):
    ds = make_datasets("--max-upload-bytes", "100000")  # unpacked: at most 4 x 100000
    upload(ds, zip_of(folder), name="kept")
    data = zip_of(folder, {"star/noise.png": os.urandom(60_000), "star/zeros.png": b"\0" * 400_000})
    assert len(data) < 100_000 and len(data) * MAX_EXPANSION_RATIO > 460_000  # within the ratio, over the cap
    refused(ds, data, r"unpacks to more than 400000 bytes \(4 x the server's max_upload_bytes")


def test_an_archive_of_compressed_images_is_far_inside_the_ratio(make_datasets, tmp_path):
    # JPEGs and PNGs hardly deflate further: a real image archive unpacks to about its size.
    ds = make_datasets()
    src = write_image_folder(tmp_path / "jpegs", CLASSES, 5, size=64, seed=3, image_format="JPEG")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*.jpg")):
            zf.write(p, p.relative_to(src).as_posix())
    data = buf.getvalue()
    dataset = upload(ds, data)
    assert dataset.image_count == 10 and dataset.size_bytes < 2 * len(data)


# --- files that do not decode ----------------------------------------------------------


def test_files_that_do_not_decode_are_reported_and_not_published(ds, folder):
    blobs = {
        "star/blob.png": os.urandom(2 << 20),  # large, named like an image, not one
        "star/cut.png": png_bytes()[:60],  # a PNG cut short
        "diamond/liar.png": png_bytes()[:33] + os.urandom(1 << 20),  # a PNG header, then noise
    }
    dataset = upload(ds, zip_of(folder, blobs), name="new")
    assert dataset.image_count == 10
    assert sorted((w.kind, w.path) for w in dataset.warnings) == sorted((W.KIND_CORRUPT, p) for p in blobs)
    files = ds.dataset_dir(dataset.id) / "files"
    on_disk = {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}
    manifest = ds.manifest(dataset.id)
    assert on_disk == {rel for split in ("train", "val", "test") for rel, _ in manifest.splits[split]}
    assert sum(p.stat().st_size for p in files.rglob("*") if p.is_file()) == dataset.size_bytes


def test_a_registered_directorys_undecodable_files_are_skipped_but_left_where_they_are(make_datasets, tmp_path):
    ds = make_datasets()
    root = write_image_folder(tmp_path / "data" / "shapes", CLASSES, 3, size=16)
    (root / "star" / "blob.png").write_bytes(b"not an image")
    dataset = ds.register("shapes", "shapes", None)
    assert dataset.image_count == 6
    assert [(w.kind, w.path) for w in dataset.warnings] == [(W.KIND_CORRUPT, "star/blob.png")]
    assert (root / "star" / "blob.png").read_bytes() == b"not an image"  # the user's file, untouched


# --- through a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("limits") / "home").start()
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def tl(server):
    with tlclient.Client(server.address, timeout=60) as c:
        yield c


def test_a_zip_bomb_is_invalid_argument_over_grpc_and_leaves_nothing(server, tl, folder, tmp_path):
    kept = tl.upload_dataset(folder, name="kept-over-grpc")
    home = server.home / "datasets"
    before = sorted(p.relative_to(home).as_posix() for p in home.rglob("*"))
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(zip_of(folder, {"star/bomb.png": b"\0" * BOMB_BYTES}))
    with pytest.raises(tlclient.TLServeError) as e:
        tl.upload_dataset(bomb, name="bomb")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"over the limit of {MAX_EXPANSION_RATIO} unpacked bytes per archive byte" in e.value.message
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == before
    assert [d.name for d in tl.list_datasets().datasets if d.name in ("kept-over-grpc", "bomb")] == [kept.name]


def test_an_undecodable_png_is_a_warning_over_grpc_and_is_not_published(server, tl, folder, tmp_path):
    archive_path = tmp_path / "blob.zip"
    archive_path.write_bytes(zip_of(folder, {"star/blob.png": os.urandom(1 << 20)}))
    dataset = tl.upload_dataset(archive_path, name="with-blob")
    assert [(w.kind, w.path) for w in dataset.warnings] == [(W.KIND_CORRUPT, "star/blob.png")]
    files = server.home / "datasets" / dataset.id / "files"
    assert files.is_dir() and not (files / "star" / "blob.png").exists()


def test_a_thin_strip_in_a_dataset_is_skipped_like_an_undecodable_file(tmp_path):
    """Resized by its short side for training, a 1 x 4000 strip would be 36 x 144,000
    pixels at 32 px: ingestion skips it (CORRUPT warning) before any pixel is decoded."""
    import io

    from PIL import Image

    from tlserve.service.datasets.ingest import check_image

    path = tmp_path / "strip.png"
    buffer = io.BytesIO()
    Image.new("L", (4000, 1)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    checked = check_image(path, max_pixels=50_000_000)
    assert "4000x1 is longer than 32 times its width or height" in checked.problem
    Image.new("L", (64, 2)).save(path, "PNG")  # 32:1 exactly is accepted
    assert check_image(path, max_pixels=50_000_000).problem == ""
