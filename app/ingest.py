"""The app's uploads go through the dataset ingest path shared with `scaleseg data add`
(training/data/ingest.py); these names stay importable from here."""
from training.data.ingest import (MAX_ENTRY_BYTES, MAX_PIXELS, MAX_UPLOAD_BYTES, IngestReport, UploadTooLarge,  # noqa: F401
                                  content_index, decode_upload, ingest, pixel_hash, read_upload)
