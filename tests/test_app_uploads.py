"""Uploads stay bounded and explain themselves: zip archives are streamed under per-entry and per-upload
caps, messages name files and reasons (never object reprs), photos are stored upright, and Predict refuses
oversized or damaged files with a message before decoding them."""
from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image

from app.ingest import ingest
from training.data.folder import find_image, read_split

MB = 1024 * 1024


def png_bytes(seed: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_zip_is_streamed_under_a_total_cap(data_copy, tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("first.png", png_bytes(1))
        for k in range(6):
            z.writestr(f"zeros{k}.png", bytes(3 * MB))  # 3 MB each, a few KB compressed
    tracemalloc.start()
    report = ingest(data_copy, [archive], max_entry_bytes=4 * MB, max_upload_bytes=10 * MB)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(report.added) == 1  # entries before the cap are kept
    assert [k for k in report.invalid if k.startswith("bomb.zip:zeros")] == ["bomb.zip:zeros0.png", "bomb.zip:zeros1.png",
                                                                              "bomb.zip:zeros2.png"]
    assert "more than 10,485,760 bytes in all" in report.invalid["bomb.zip"]  # stopped at the 4th; the rest unread
    assert peak < 8 * MB, peak  # one entry (plus its chunks) at a time, not 18 MB of entries


def test_zip_entry_lying_about_its_size_is_rejected_alone(data_copy, tmp_path):
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("liar.png", bytes(5 * MB))
        z.writestr("good.png", png_bytes(2))
    raw = bytearray(archive.read_bytes())
    claimed = struct.pack("<I", 1000)
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header and central directory sizes
        at = raw.index(sig)
        raw[at + offset:at + offset + 4] = claimed
    archive.write_bytes(bytes(raw))
    report = ingest(data_copy, [archive], max_entry_bytes=2 * MB)
    assert len(report.added) == 1 and list(report.invalid) == ["liar.zip:liar.png"]
    assert "damaged" in report.invalid["liar.zip:liar.png"]


def test_ingest_messages_are_plain_and_list_ids(data_copy, tmp_path):
    (tmp_path / "broken.png").write_bytes(png_bytes(2)[:60])
    (tmp_path / "text.png").write_text("not an image at all")
    (tmp_path / "ok.png").write_bytes(png_bytes(3))
    report = ingest(data_copy, [tmp_path / "broken.png", tmp_path / "text.png", tmp_path / "ok.png"])
    summary = report.summary()
    assert "object at 0x" not in summary and "BytesIO" not in summary
    lines = summary.splitlines()
    assert lines[0] == f"1 added: {report.added[0]}"
    assert lines[2:] == ["2 rejected:", "- broken.png: " + report.invalid["broken.png"], "- text.png: " + report.invalid["text.png"]]
    assert "damaged or truncated" in report.invalid["broken.png"] and "not an image file" in report.invalid["text.png"]


def test_exif_orientation_is_applied_on_ingest(data_copy, tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high; the camera says rotate 90° clockwise
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    (image_id,) = ingest(data_copy, [tmp_path / "phone.jpg"]).added
    with Image.open(find_image(data_copy, image_id)) as stored:
        upright = np.asarray(stored)
    assert upright.shape == (40, 20, 3)
    assert upright[:10].mean() > 200 and upright[-10:].mean() < 50  # the bright left edge is now on top
    assert read_split(data_copy, "unlabeled")[-1] == image_id


def test_predict_refuses_oversized_and_damaged_files_with_a_message(package, data_copy, tmp_path):
    from gradio_client import Client, handle_file

    from app.ui import App

    app = App(package, data_copy, tmp_path / "work")
    demo = app.blocks()
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, ssr_mode=False, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        Image.fromarray(np.zeros((4200, 4200), np.uint8)).save(tmp_path / "huge.png")  # 17.6 Mpx, 18 KB on disk
        with pytest.raises(Exception, match=r"huge.png: 4200x4200 is larger than the 4,194,304-pixel limit"):
            client.predict(handle_file(str(tmp_path / "huge.png")), 0.5, False, api_name="/predict")
        # The CIF graph runs 1 + 0.25 + 4 = 5.25x the pixels: serving's budget allows a smaller image there.
        Image.fromarray(np.zeros((1000, 1000), np.uint8)).save(tmp_path / "big.png")
        with pytest.raises(Exception, match=r"big.png: 1000x1000 is larger than the 798,915-pixel limit"):
            client.predict(handle_file(str(tmp_path / "big.png")), 0.5, True, api_name="/predict")
        (tmp_path / "damaged.png").write_bytes(png_bytes(4)[:80])
        with pytest.raises(Exception, match=r"damaged.png: the file is damaged or truncated"):
            client.predict(handle_file(str(tmp_path / "damaged.png")), 0.5, False, api_name="/predict")
        (tmp_path / "fine.png").write_bytes(png_bytes(5, (64, 48)))
        *_, info, _ = client.predict(handle_file(str(tmp_path / "fine.png")), 0.5, False, api_name="/predict")
        assert "single scale" in info
    finally:
        demo.close()


def test_overlay_leaves_background_unpainted_and_has_a_legend(tiny_data):
    from app.ui import legend, overlay
    from training.data.folder import class_dicts, load_classes

    classes = class_dicts(load_classes(tiny_data))
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8)
    labels = np.zeros((8, 8), np.int32)
    labels[:, 4:] = 2
    out = overlay(rgb, labels, classes, 0.5)
    assert np.array_equal(out[:, :4], rgb[:, :4])  # background: the image itself, not darkened
    colour = np.array(classes[2]["color"], np.float32)
    assert np.allclose(out[:, 4:], (rgb[:, 4:] * 0.5 + colour * 0.5).astype(np.uint8), atol=1)
    html = legend(classes, labels)
    assert "square" in html and "rgb({},{},{})".format(*classes[2]["color"]) in html
    assert "disc" not in html and "background (not painted)" in html
