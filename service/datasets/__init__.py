"""Dataset ingestion: uploaded archives and registered directories become validated,
split, manifest-backed datasets that the training engine can read.

Two sources. `Datasets.begin_upload` receives a .zip, .tar or .tar.gz stream
(`Upload.write` per chunk, `Upload.finish` at the end): the archive's entry list is
checked first (paths, entry types, counts, declared sizes), and only then are the
image files extracted into HOME/datasets/<id>/files. `Datasets.register` points at a
directory under the server's data root and leaves the files where they are. Both
then share one pipeline: work out the layout (one folder per class, optionally under
train/ val/ test/ folders, a single wrapping folder stripped), check every image
(sha256, header size against `max_image_pixels` before any decoding, then a decode),
split stratified by class with a seed where split folders are missing, and publish:
the manifest (`service.manifest`) is written first, then the `datasets` row, so a row
always has a manifest. A rejected dataset leaves no row, no files and no temporary.

    datasets = Datasets(settings, store)
    upload = datasets.begin_upload(metadata)
    for chunk in chunks:
        upload.write(chunk)
    dataset = upload.finish()                       # blocking: run it in a thread
    datasets.register("flowers", "flowers/v2", pb.SplitOptions(seed=1))

Decisions worth knowing (see the constants below for the numbers):
- Split sizes per class: val and test each get round-half-up(n × fraction), at
  least 1 while the class can spare it, and train always keeps at least 1 image;
  when a class is too small, test gives way first, then val. 5 images → 3/1/1,
  3 → 1/1/1, 2 → 1/1/0, 1 → 1/0/0. Identical files (same sha256) in one class are
  kept in the same split, so generated splits never leak a duplicate.
- Zip/tar bombs: the declared uncompressed sizes of all entries together may not
  exceed `MAX_EXPANSION_RATIO` × the archive's own size nor `UNPACKED_SIZE_FACTOR`
  × max_upload_bytes, checked before anything is extracted; extraction counts the
  bytes it really writes and stops an entry at the size it declared; single tar
  header reads are capped.
- Files that fail their image check (not an image, corrupt) are skipped with a
  CORRUPT warning; an upload's copies of them are deleted, so the published
  files/ folder holds exactly the images the manifest lists.
- Warnings: at most `WARNINGS_PER_KIND` per kind, then one summary warning of
  that kind whose `detail` gives the number left out.
- Hidden entries (a path component starting with '.') and macOS `__MACOSX/`
  folders are skipped silently; other non-image files are skipped with an
  IGNORED warning.
"""

from __future__ import annotations

from tlserve.service.datasets.archive import (  # noqa: F401 - the package's API
    sniff_format,
)
from tlserve.service.datasets.catalog import (  # noqa: F401 - the package's API
    Datasets,
)
from tlserve.service.datasets.common import (  # noqa: F401 - the package's API
    DEFAULT_FRACTION,
    ID_PREFIX,
    IMAGE_EXTENSIONS,
    MANIFEST_FILE,
    MAX_EXPANSION_RATIO,
    UNPACKED_SIZE_FACTOR,
    UPLOADS_DIR,
    WARNINGS_PER_KIND,
    SplitConfig,
    split_sizes,
    validate_name,
)
from tlserve.service.datasets.ingest import (  # noqa: F401 - the package's API
    check_image,
)
from tlserve.service.datasets.layout import (  # noqa: F401 - the package's API
    plan_layout,
)
from tlserve.service.datasets.upload import (  # noqa: F401 - the package's API
    Upload,
)
