"""Dataset ingestion (service.datasets) without a server: uploads of zip/tar/tar.gz
archives, registered directories, layouts, splits, warnings, every rejection (and
that it leaves nothing behind), and get/list/delete."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import shutil
import stat
import tarfile
import warnings
import zipfile

import pytest
from PIL import Image, ImageFile

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import datasets as dsmod
from tlserve.service.datasets import archive
from tlserve.service.datasets import upload as upload_module
from tlserve.service.datasets import Datasets, split_sizes
from tlserve.service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tlserve.service.manifest import Manifest
from tlserve.service.training.synthetic import write_image_folder

CLASSES = ("diamond", "star")
W = pb.DatasetWarning


# --- helpers -----------------------------------------------------------------------


@pytest.fixture
def ds(make_datasets):
    return make_datasets()


@pytest.fixture
def folder(tmp_path):
    """2 classes x 5 images of 16 px, no split folders."""
    return write_image_folder(tmp_path / "src", CLASSES, 5, size=16, seed=1)


def make_archive(src: pathlib.Path, dest: pathlib.Path, fmt: str = "zip", prefix: str = "") -> pathlib.Path:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if fmt == "zip":
        with zipfile.ZipFile(dest, "w") as zf:
            for p in files:
                zf.write(p, prefix + p.relative_to(src).as_posix())
    else:
        with tarfile.open(dest, "w:gz" if fmt == "tar.gz" else "w") as tf:
            for p in files:
                tf.add(p, prefix + p.relative_to(src).as_posix())
    return dest


def upload(ds: Datasets, data: bytes | pathlib.Path, name: str = "shapes", *, fmt: int = 0,
           sha256: str | None = None, size: int | None = None, split: pb.SplitOptions | None = None,
           chunk: int = 4096) -> pb.Dataset:
    if isinstance(data, pathlib.Path):
        data = data.read_bytes()
    meta = pb.UploadDatasetMetadata(
        name=name, format=fmt, size_bytes=len(data) if size is None else size,
        sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256, split=split,
    )
    up = ds.begin_upload(meta)
    for i in range(0, len(data), chunk):
        up.write(data[i:i + chunk])
    return up.finish()


def snapshot(ds: Datasets):
    root = ds.settings.datasets_dir
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    rows = [tuple(r) for r in ds.store.query("SELECT id, name FROM datasets")]
    return files, rows


def counts(dataset: pb.Dataset) -> dict[int, dict[str, int]]:
    return {s.split: dict(s.class_counts) for s in dataset.splits}


def tar_with(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def png_bytes(size: int = 16, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), 0).save(buf, format="PNG")
    return buf.getvalue()


# --- uploads and layouts -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_upload_of_each_archive_format_gives_stratified_splits_and_a_manifest(ds, folder, tmp_path, fmt):
    archive = make_archive(folder, tmp_path / f"a.{fmt}", fmt)
    before = snapshot(ds)[0]
    dataset = upload(ds, archive, split=pb.SplitOptions(seed=7))  # format sniffed from the bytes

    assert dataset.id.startswith("ds-") and len(dataset.id) == 11
    assert dataset.name == "shapes" and dataset.source == "upload"
    assert dataset.create_time.seconds > 0
    assert list(dataset.class_names) == sorted(CLASSES)
    assert dataset.image_count == 10 and dataset.generated_splits
    # 5 per class: 3 train, 1 val, 1 test (see split_sizes).
    assert counts(dataset) == {
        pb.SPLIT_TRAIN: {"diamond": 3, "star": 3}, pb.SPLIT_VAL: {"diamond": 1, "star": 1},
        pb.SPLIT_TEST: {"diamond": 1, "star": 1},
    }
    assert dataset.image_sizes.min_width == dataset.image_sizes.max_height == dataset.image_sizes.median_width == 16
    assert dataset.size_bytes == sum(p.stat().st_size for p in folder.rglob("*.png"))
    assert list(dataset.warnings) == []

    manifest = ds.manifest("shapes")
    assert manifest.root == ds.settings.datasets_dir.resolve() / dataset.id / "files"
    assert manifest.class_names == tuple(sorted(CLASSES))
    for split in ("train", "val", "test"):
        for path, label in manifest.samples(split):
            assert path.is_file() and path.parent.name == manifest.class_names[label]
    assert ds.manifest_path(dataset.id) == ds.settings.datasets_dir.resolve() / dataset.id / "manifest.json"
    # Nothing but the new dataset's folder was added; no temporary is left.
    assert set(snapshot(ds)[0]) - set(before) == {
        p.relative_to(ds.settings.datasets_dir).as_posix()
        for p in (ds.settings.datasets_dir / dataset.id).rglob("*")
    } | {dataset.id}
    assert list(ds.uploads_dir.iterdir()) == []
    row = ds.store.query("SELECT path, proto FROM datasets")[0]
    assert row["path"] == f"datasets/{dataset.id}" and pb.Dataset.FromString(row["proto"]) == dataset


def test_same_seed_gives_the_same_splits_and_another_seed_others(make_datasets, tmp_path):
    ds = make_datasets()
    write_image_folder(tmp_path / "data" / "shapes", CLASSES, 10, size=16, seed=2)
    splits = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        dataset = ds.register(name, "shapes", pb.SplitOptions(seed=seed))
        splits[name] = ds.manifest(dataset.id).splits
    assert splits["a"] == splits["b"]
    assert splits["a"] != splits["c"]
    # 10 per class with the default fractions: 6/2/2.
    assert Manifest.class_counts(ds.manifest("a"), "val") == [2, 2]


@pytest.mark.parametrize(("n", "expected"), [
    (1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (4, (2, 1, 1)), (5, (3, 1, 1)),
    (7, (5, 1, 1)), (10, (6, 2, 2)), (20, (14, 3, 3)), (100, (70, 15, 15)),
])
def test_split_sizes_keep_a_train_image_and_give_val_and_test_one_where_possible(n, expected):
    assert split_sizes(n, 0.15, 0.15) == expected


def test_split_sizes_make_only_the_asked_splits():
    assert split_sizes(5, 0.0, 0.15) == (4, 0, 1)
    assert split_sizes(10, 0.5, 0.45) == (1, 5, 4)


def test_a_wrapping_top_folder_is_stripped(ds, folder, tmp_path):
    # A stray top-level hidden file and __MACOSX folder don't stop the stripping.
    archive = tmp_path / "a.zip"
    make_archive(folder, archive, "zip", prefix="my-shapes/")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("__MACOSX/my-shapes/._x.png", b"junk")
        zf.writestr(".DS_Store", b"junk")
    dataset = upload(ds, archive)
    assert list(dataset.class_names) == sorted(CLASSES) and dataset.image_count == 10
    assert list(dataset.warnings) == []
    manifest = ds.manifest(dataset.id)
    assert all(rel.split("/")[0] in CLASSES for rel, _ in manifest.splits["train"])


def test_split_folders_are_kept_as_they_are(ds, tmp_path):
    src = write_image_folder(tmp_path / "src", CLASSES, 0, size=16, splits={"train": 3, "val": 2, "test": 1})
    dataset = upload(ds, make_archive(src, tmp_path / "a.tar", "tar"))
    assert not dataset.generated_splits
    assert counts(dataset) == {
        pb.SPLIT_TRAIN: {"diamond": 3, "star": 3}, pb.SPLIT_VAL: {"diamond": 2, "star": 2},
        pb.SPLIT_TEST: {"diamond": 1, "star": 1},
    }
    assert all(rel.startswith("val/") for rel, _ in ds.manifest(dataset.id).splits["val"])


def test_missing_val_and_test_folders_are_carved_from_train(ds, tmp_path):
    src = write_image_folder(tmp_path / "src", CLASSES, 0, size=16, splits={"train": 5})
    dataset = upload(ds, make_archive(src, tmp_path / "a.zip"), name="train-only")
    assert dataset.generated_splits
    assert [s.image_count for s in dataset.splits] == [6, 2, 2]

    src2 = write_image_folder(tmp_path / "src2", CLASSES, 0, size=16, splits={"train": 5, "validation": 2})
    dataset = upload(ds, make_archive(src2, tmp_path / "b.zip"), name="no-test")
    assert dataset.generated_splits
    # val is the folder's (2 per class); test is carved from train: 5 → 4 + 1.
    assert [s.image_count for s in dataset.splits] == [8, 4, 2]


def test_register_keeps_files_in_place_and_delete_leaves_them(ds, tmp_path):
    src = write_image_folder(tmp_path / "data" / "sets" / "shapes", CLASSES, 5, size=16)
    dataset = ds.register("shapes", "sets/shapes", pb.SplitOptions(seed=3))
    assert dataset.source == "sets/shapes" and dataset.image_count == 10
    manifest = ds.manifest(dataset.id)
    assert manifest.root == src.resolve()
    assert sorted(p.name for p in (ds.settings.datasets_dir / dataset.id).iterdir()) == ["manifest.json"]
    ds.delete("shapes")
    assert not (ds.settings.datasets_dir / dataset.id).exists()
    assert len(list(src.rglob("*.png"))) == 10


def test_register_refuses_paths_outside_the_data_root(ds, tmp_path):
    write_image_folder(tmp_path / "outside", CLASSES, 3, size=16)
    (tmp_path / "data" / "escape").symlink_to(tmp_path / "outside")
    before = snapshot(ds)
    for path, error, words in [
        ("../outside", InvalidArgument, "'..'"),
        (str(tmp_path / "outside"), InvalidArgument, "absolute"),
        ("escape", InvalidArgument, "outside the server's data root"),
        ("", InvalidArgument, "path is empty"),
        ("missing", NotFound, "not found under the server's data root"),
    ]:
        with pytest.raises(error, match=words):
            ds.register("x", path, pb.SplitOptions())
    assert snapshot(ds) == before


def test_registered_symlinks_inside_the_directory_are_not_followed(ds, tmp_path):
    root = write_image_folder(tmp_path / "data" / "shapes", CLASSES, 3, size=16)
    (root / "star" / "link.png").symlink_to(root / "diamond" / "diamond_000.png")
    dataset = ds.register("shapes", "shapes", pb.SplitOptions())
    assert dataset.image_count == 6
    assert [(w.kind, w.path) for w in dataset.warnings] == [(W.KIND_IGNORED, "star/link.png")]


# --- warnings --------------------------------------------------------------------------


def test_corrupt_and_non_image_files_are_skipped_with_warnings(ds, folder, tmp_path):
    (folder / "star" / "broken.png").write_bytes(png_bytes()[:40])  # header only, data cut
    (folder / "star" / "fake.jpg").write_bytes(b"not a jpeg at all")
    (folder / "star" / "notes.txt").write_text("hello")
    (folder / "README.md").write_text("top-level file")
    dataset = upload(ds, make_archive(folder, tmp_path / "a.zip"))
    assert dataset.image_count == 10
    got = sorted((w.kind, w.path) for w in dataset.warnings)
    assert got == [
        (W.KIND_CORRUPT, "star/broken.png"), (W.KIND_CORRUPT, "star/fake.jpg"),
        (W.KIND_IGNORED, "README.md"), (W.KIND_IGNORED, "star/notes.txt"),
    ]
    manifest = ds.manifest(dataset.id)
    listed = {rel for s in ("train", "val", "test") for rel, _ in manifest.splits[s]}
    assert "star/broken.png" not in listed and len(listed) == 10


def test_duplicates_and_leakage_are_reported(ds, tmp_path):
    src = write_image_folder(tmp_path / "src", CLASSES, 0, size=16, splits={"train": 3, "val": 1, "test": 1})
    shutil.copy(src / "train/star/star_000.png", src / "train/star/copy.png")  # same split
    shutil.copy(src / "train/star/star_001.png", src / "test/star/leak.png")  # another split
    dataset = upload(ds, make_archive(src, tmp_path / "a.zip"))
    got = sorted((w.kind, w.path, w.other_path) for w in dataset.warnings)
    assert got == [
        (W.KIND_DUPLICATE, "train/star/star_000.png", "train/star/copy.png"),
        (W.KIND_LEAKAGE, "test/star/leak.png", "train/star/star_001.png"),
    ]


def test_generated_splits_keep_identical_files_together(ds, folder, tmp_path):
    for i in range(4):
        shutil.copy(folder / "star/star_000.png", folder / f"star/copy{i}.png")
    dataset = upload(ds, make_archive(folder, tmp_path / "a.zip"))
    assert {w.kind for w in dataset.warnings} == {W.KIND_DUPLICATE}
    assert len(dataset.warnings) == 4


def test_warnings_are_capped_per_kind_with_a_count(ds, folder, tmp_path):
    for i in range(dsmod.WARNINGS_PER_KIND + 5):
        (folder / "star" / f"n{i}.txt").write_text("x")
    dataset = upload(ds, make_archive(folder, tmp_path / "a.zip"))
    assert len(dataset.warnings) == dsmod.WARNINGS_PER_KIND + 1
    assert dataset.warnings[-1].detail == f"5 more ignored warnings not listed ({dsmod.WARNINGS_PER_KIND + 5} in all)"


# --- rejections: the right error, and nothing left behind ------------------------------


def _zip_with(folder: pathlib.Path, extra) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, p.relative_to(folder).as_posix())
        extra(zf)
    return buf.getvalue()


def _zip_symlink(zf: zipfile.ZipFile) -> None:
    info = zipfile.ZipInfo("star/link.png")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, "/etc/passwd")


def _zip_duplicate(zf: zipfile.ZipFile) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name": that is the point
        zf.writestr("star/star_000.png", b"x")


def _tar_member(name: str, kind: bytes, data: bytes | None = None, **kw) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in kw.items():
        setattr(info, k, v)
    return tar_with([(tarfile.TarInfo("star/a.png"), png_bytes()), (info, data)])


REJECTIONS = {
    "dotdot-entry": (lambda f: _zip_with(f, lambda zf: zf.writestr("star/../../evil.png", png_bytes())), "'..'"),
    "absolute-entry": (lambda f: _zip_with(f, lambda zf: zf.writestr("/tmp/evil.png", png_bytes())), "absolute"),
    "zip-symlink": (lambda f: _zip_with(f, _zip_symlink), "symbolic link"),
    "tar-symlink": (lambda f: _tar_member("star/l.png", tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
    "tar-hardlink": (lambda f: _tar_member("star/h.png", tarfile.LNKTYPE, linkname="star/a.png"), "hard link"),
    "tar-device": (lambda f: _tar_member("star/dev", tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
    "tar-dotdot": (lambda f: _tar_member("../x.png", tarfile.REGTYPE, png_bytes()), "'..'"),
    "one-class": (lambda f: _zip_with(f / "star", lambda zf: None), "at least 2 classes, found 0"),
    "class-without-images": (
        lambda f: _zip_with(f, lambda zf: zf.writestr("empty/broken.png", b"garbage")),
        "class empty has no usable image"),
    "duplicate-entry": (lambda f: _zip_with(f, _zip_duplicate), "twice"),
    "not-an-archive": (lambda f: b"hello, this is text" * 100, "not a zip, tar or tar.gz"),
    "truncated-zip": (lambda f: _zip_with(f, lambda zf: None)[:-300], "truncated or malformed"),
    "truncated-tar.gz": (
        lambda f: make_archive(f, f.parent / "t.tar.gz", "tar.gz").read_bytes()[:-200], "truncated or malformed"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_bad_archive_is_rejected_and_leaves_nothing(ds, folder, case):
    build, words = REJECTIONS[case]
    data = build(folder)
    before = snapshot(ds)
    with pytest.raises(InvalidArgument, match=words):
        upload(ds, data)
    assert snapshot(ds) == before


def test_zip_bomb_is_refused_from_its_declared_sizes(make_datasets, folder):
    ds = make_datasets("--max-upload-bytes", "100000")  # unpacked bound: 4 x 100000
    data = _zip_with(folder, lambda zf: zf.writestr(
        zipfile.ZipInfo("star/bomb.png"), b"\0" * 1_000_000, compress_type=zipfile.ZIP_DEFLATED))
    assert len(data) < 100_000
    before = snapshot(ds)
    with pytest.raises(InvalidArgument, match="unpacks to more than 400000 bytes"):
        upload(ds, data)
    assert snapshot(ds) == before


def test_upload_over_the_size_limits_is_refused(make_datasets, folder, tmp_path):
    ds = make_datasets("--max-upload-bytes", "5000")
    data = make_archive(folder, tmp_path / "a.zip").read_bytes()
    before = snapshot(ds)
    with pytest.raises(InvalidArgument, match="metadata.size_bytes .* max_upload_bytes 5000"):
        upload(ds, data)  # declared size refused at once
    with pytest.raises(InvalidArgument, match="over the server's max_upload_bytes 5000"):
        upload(ds, data, size=0)  # unknown size: refused while streaming
    assert snapshot(ds) == before
    ds2 = make_datasets()
    with pytest.raises(InvalidArgument, match="more than metadata.size_bytes 100"):
        upload(ds2, data, size=100)
    with pytest.raises(InvalidArgument, match=r"received \d+ bytes but metadata.size_bytes"):
        upload(ds2, data, size=len(data) + 1)
    assert snapshot(ds2) == before


def test_too_many_entries_is_refused(make_datasets, folder, tmp_path):
    ds = make_datasets("--max-dataset-files", "5")
    before = snapshot(ds)
    with pytest.raises(InvalidArgument, match="more than 5 entries.*max_dataset_files"):
        upload(ds, make_archive(folder, tmp_path / "a.tar", "tar"))
    (tmp_path / "data" / "shapes").symlink_to(folder)
    shutil.copytree(folder, tmp_path / "data" / "copy")
    with pytest.raises(InvalidArgument, match="more than 5 entries"):
        ds.register("x", "copy", pb.SplitOptions())
    assert snapshot(ds) == before


def test_sha256_mismatch_is_refused(ds, folder, tmp_path):
    before = snapshot(ds)
    with pytest.raises(InvalidArgument, match="sha256 mismatch"):
        upload(ds, make_archive(folder, tmp_path / "a.zip"), sha256="0" * 64)
    assert snapshot(ds) == before


def test_declared_format_must_match_the_bytes(ds, folder, tmp_path):
    before = snapshot(ds)
    with pytest.raises(InvalidArgument, match="metadata.format is tar.gz but .* say zip"):
        upload(ds, make_archive(folder, tmp_path / "a.zip"), fmt=pb.ARCHIVE_FORMAT_TAR_GZ)
    assert snapshot(ds) == before


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 65, "ds-0123abcd", "naïve"])
def test_bad_names_are_refused_before_any_byte(ds, name):
    before = snapshot(ds)
    with pytest.raises(InvalidArgument, match="name"):
        ds.begin_upload(pb.UploadDatasetMetadata(name=name))
    assert snapshot(ds) == before


def test_bad_split_options_are_refused(ds):
    with pytest.raises(InvalidArgument, match="metadata.split.val_fraction"):
        ds.begin_upload(pb.UploadDatasetMetadata(name="a", split=pb.SplitOptions(val_fraction=-0.1)))
    with pytest.raises(InvalidArgument, match="below 1"):
        ds.begin_upload(pb.UploadDatasetMetadata(name="a", split=pb.SplitOptions(val_fraction=0.6, test_fraction=0.5)))


def test_a_name_in_use_is_refused(ds, folder, tmp_path):
    data = make_archive(folder, tmp_path / "a.zip")
    upload(ds, data)
    before = snapshot(ds)
    with pytest.raises(AlreadyExists, match="'shapes' exists already"):
        upload(ds, data)
    shutil.copytree(folder, tmp_path / "data" / "shapes")
    with pytest.raises(AlreadyExists):
        ds.register("shapes", "shapes", pb.SplitOptions())
    assert snapshot(ds) == before


def test_an_image_over_the_pixel_limit_is_refused_without_decoding(make_datasets, folder, tmp_path, monkeypatch):
    ds = make_datasets("--max-image-pixels", "1000000")
    big = io.BytesIO()
    Image.new("1", (2000, 1000)).save(big, format="PNG")  # 2 Mpx, a few hundred bytes
    (folder / "star" / "huge.png").write_bytes(big.getvalue())
    data = make_archive(folder, tmp_path / "a.zip").read_bytes()

    decoded, load = [], ImageFile.ImageFile.load

    def recording_load(self):
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    before = snapshot(ds)
    with pytest.raises(InvalidArgument, match=r"star/huge.png is 2000x1000 = 2000000 pixels.*max_image_pixels 1000000"):
        upload(ds, data)
    assert snapshot(ds) == before
    assert decoded and (2000, 1000) not in decoded  # the others were decoded, the big one never


def test_pils_own_bomb_check_refuses_the_dataset_instead_of_crashing(ds, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 16x16 = 256 > 2 x 50: PIL raises
    before = snapshot(ds)
    with pytest.raises(InvalidArgument, match="bomb check"):
        upload(ds, make_archive(folder, tmp_path / "a.zip"))
    assert snapshot(ds) == before


def test_abort_removes_the_temporary_file(ds, folder, tmp_path):
    before = snapshot(ds)
    up = ds.begin_upload(pb.UploadDatasetMetadata(name="a"))
    up.write(make_archive(folder, tmp_path / "a.zip").read_bytes())
    assert list(ds.uploads_dir.iterdir())
    up.abort()
    assert snapshot(ds) == before
    with pytest.raises(FailedPrecondition):
        up.write(b"more")


# --- get, list, delete -----------------------------------------------------------------


def test_get_list_pages_and_delete(ds, tmp_path):
    write_image_folder(tmp_path / "data" / "shapes", CLASSES, 3, size=16)
    made = [ds.register(f"set{i}", "shapes", pb.SplitOptions()) for i in range(5)]
    assert ds.get(made[2].id) == ds.get("set2") == made[2]
    with pytest.raises(NotFound, match="'nope' not found; ListDatasets"):
        ds.get("nope")

    seen, token = [], ""
    while True:
        page, token = ds.list(2, token)
        assert len(page) <= 2
        seen += [d.name for d in page]
        if not token:
            break
    assert seen == ["set4", "set3", "set2", "set1", "set0"]  # newest first
    assert [d.name for d in ds.list(0, "")[0]] == seen
    with pytest.raises(InvalidArgument, match="page_token"):
        ds.list(2, "garbage!")
    with pytest.raises(InvalidArgument, match="page_size"):
        ds.list(-1, "")

    ds.delete("set1")
    ds.delete(made[3].id)
    assert [d.name for d in ds.list(0, "")[0]] == ["set4", "set2", "set0"]
    with pytest.raises(NotFound):
        ds.delete("set1")


def test_delete_is_refused_while_a_job_uses_the_dataset(ds, folder, tmp_path):
    dataset = upload(ds, make_archive(folder, tmp_path / "a.zip"))
    with ds.store.transaction() as conn:
        conn.execute(
            "INSERT INTO jobs (id, state, create_time, update_time, dataset_id, model_name, proto) "
            "VALUES ('job-1', ?, 0, 0, ?, 'm', x'')", (pb.JOB_STATE_RUNNING, dataset.id))
    with pytest.raises(FailedPrecondition, match="used by queued or running job.* job-1"):
        ds.delete("shapes")
    assert ds.get("shapes") == dataset and (ds.settings.datasets_dir / dataset.id / "files").is_dir()

    with ds.store.transaction() as conn:
        conn.execute("UPDATE jobs SET state = ? WHERE id = 'job-1'", (pb.JOB_STATE_SUCCEEDED,))
    ds.delete("shapes")
    assert not (ds.settings.datasets_dir / dataset.id).exists()
    assert ds.store.query("SELECT * FROM datasets") == []


def test_remove_leftovers_clears_crash_debris_only(ds, folder, tmp_path):
    kept = upload(ds, make_archive(folder, tmp_path / "a.zip"))
    (ds.uploads_dir / "ds-00000000.part").write_bytes(b"x")
    (ds.settings.datasets_dir / "ds-11111111").mkdir()
    assert ds.remove_leftovers() == 2
    assert sorted(os.listdir(ds.settings.datasets_dir)) == sorted([".uploads", kept.id])


def test_a_huge_tar_header_is_refused_before_it_is_read(ds, folder, monkeypatch):
    monkeypatch.setattr(archive, "_MAX_TAR_READ_BYTES", 1024)  # the real cap is 16 MiB; same code path
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        tf.add(folder / "star", "star")
        info = tarfile.TarInfo("diamond/" + "x" * 2000 + ".png")  # a pax header of about 2 KiB
        data = png_bytes()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    before = snapshot(ds)
    with pytest.raises(InvalidArgument, match="header over 1024 bytes"):
        upload(ds, buf.getvalue())
    assert snapshot(ds) == before


def test_cancel_while_finishing_removes_everything(ds, folder, tmp_path, monkeypatch):
    data = make_archive(folder, tmp_path / "a.zip").read_bytes()
    before = snapshot(ds)
    up = ds.begin_upload(pb.UploadDatasetMetadata(name="a"))
    up.write(data)
    plan = dsmod.plan_layout

    def plan_then_cancel(*args):
        up.abort()  # as the servicer would, from the event loop, while finish() runs in a thread
        return plan(*args)

    monkeypatch.setattr(upload_module, "plan_layout", plan_then_cancel)
    with pytest.raises(FailedPrecondition, match="cancelled"):
        up.finish()
    assert snapshot(ds) == before


def test_registered_split_folders_and_hidden_entries(ds, tmp_path):
    root = write_image_folder(tmp_path / "data" / "wrapped" / "inner", CLASSES, 0, size=16,
                              splits={"Train": 2, "val": 1, "test": 1})
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "Train" / "star" / ".thumb.png").write_bytes(b"junk")
    dataset = ds.register("wrapped", "wrapped", pb.SplitOptions())
    assert not dataset.generated_splits and list(dataset.warnings) == []
    assert [s.image_count for s in dataset.splits] == [4, 2, 2]
    assert ds.manifest("wrapped").root == root.resolve()
