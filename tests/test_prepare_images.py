"""prepare_dataset.load_sprite: every Pillow mode to the right 8-bit RGBA pixels, and sizes refused before decoding."""
import io
import struct
import zlib

import numpy as np
import pytest
from conftest import pokemon_row, write_csv, write_sprite
from PIL import Image, ImageFile

import prepare_dataset
from prepare_dataset import MAX_SPRITE_PIXELS, DatasetError, ImageRejected, build_dataset, load_sprite, to_rgba


# PNG files written byte by byte: Pillow cannot write 16-bit RGB, RGBA or LA, nor a 16-bit tRNS chunk.

def png_bytes(width, height, bit_depth, color_type, rows, trns=None):
    """A PNG from raw scanlines (bytes per row, filter byte excluded); rows may be a generator (huge images)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor, idat = zlib.compressobj(9), []
    for row in rows:
        idat.append(compressor.compress(b"\x00" + row))
    idat.append(compressor.flush())
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    if trns is not None:
        out += chunk(b"tRNS", struct.pack(f">{len(trns)}H", *trns))
    return out + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def png16(samples, color_type, trns=None):
    """16-bit PNG from an array of shape (height, width[, channels])."""
    a = np.asarray(samples, dtype=">u2")
    return png_bytes(a.shape[1], a.shape[0], 16, color_type, (row.tobytes() for row in a), trns)


def square(values):
    """3x3 from up to 9 values (the last repeated), so load_sprite(size=3) keeps every pixel as it is."""
    values = list(values) + [values[-1]] * (9 - len(values))
    return [values[0:3], values[3:6], values[6:9]]


def grey(v, a=255):
    return (v, v, v, a)


def palette_image(mode):
    im = Image.new(mode, (3, 3))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    return im


def p_image():
    im = palette_image("P")
    for i, index in enumerate([0, 1, 2, 3]):
        im.putpixel((i % 3, i // 3), index)
    im.info["transparency"] = 0  # a tRNS chunk making index 0 transparent
    return im


def pa_image():
    im = palette_image("PA")
    for i, (index, alpha) in enumerate([(0, 0), (1, 255), (2, 128), (3, 255)]):
        im.putpixel((i % 3, i // 3), (index, alpha))
    return im


def from_values(mode, values):
    """A 3x3 image of `mode` holding `values` row by row (Image.putdata clips some modes, so go through arrays)."""
    dtype = {"1": bool, "L": np.uint8, "I;16": np.uint16, "I;16B": ">u2", "I": np.int32, "F": np.float32}[mode]
    array = np.array(square(values), dtype=dtype)
    if mode == "1":
        return Image.fromarray(array).convert("1")
    return Image.frombytes(mode, (3, 3), array.tobytes())


def multiband(mode, pixels):
    im = Image.new(mode, (3, 3))
    for i, pixel in enumerate(square(pixels)[0] + square(pixels)[1] + square(pixels)[2]):
        im.putpixel((i % 3, i // 3), pixel)
    return im


# mode -> (image, expected RGBA pixels row by row)
CASES = {
    "1": (lambda: from_values("1", [0, 1]), [grey(0), grey(255)]),
    "L": (lambda: from_values("L", [0, 100, 255]), [grey(0), grey(100), grey(255)]),
    "LA": (lambda: multiband("LA", [(100, 0), (100, 128), (7, 255)]), [grey(100, 0), grey(100, 128), grey(7)]),
    "P": (p_image, [(0, 0, 0, 0), (255, 0, 0, 255), (0, 255, 0, 255), (0, 0, 255, 255), (0, 0, 0, 0)]),
    "PA": (pa_image, [(0, 0, 0, 0), (255, 0, 0, 255), (0, 255, 0, 128), (0, 0, 255, 255), (0, 0, 0, 0)]),
    # 16-bit grey is scaled, v / 257 rounded: 65535 -> 255, 2570 -> 10, 32768 -> 128, 65520 -> 255, 1000 -> 4
    "I;16": (lambda: from_values("I;16", [0, 2570, 32768, 65520, 65535, 1000]),
             [grey(0), grey(10), grey(128), grey(255), grey(255), grey(4)]),
    "I;16B": (lambda: from_values("I;16B", [0, 2570, 32768, 65535]), [grey(0), grey(10), grey(128), grey(255)]),
    # I is what 16-bit grey PNGs decoded to in older Pillow: the same 16-bit scale, clipped to [0, 65535]
    "I": (lambda: from_values("I", [-5, 0, 2570, 65535, 70000]), [grey(0), grey(0), grey(10), grey(255), grey(255)]),
    # F is Pillow's float grey on the L scale (0..255), clipped; NaN becomes 0
    "F": (lambda: from_values("F", [-1.0, 0.0, 100.0, 255.0, 300.0, float("nan"), 99.6]),
          [grey(0), grey(0), grey(100), grey(255), grey(255), grey(0), grey(100)]),
    "RGB": (lambda: multiband("RGB", [(10, 20, 30), (255, 0, 128)]), [(10, 20, 30, 255), (255, 0, 128, 255)]),
    "RGBA": (lambda: multiband("RGBA", [(10, 20, 30, 0), (255, 0, 128, 77)]), [(10, 20, 30, 0), (255, 0, 128, 77)]),
    # CMYK: Pillow's (255 - c) * (255 - k) / 255 per channel
    "CMYK": (lambda: multiband("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)]),
             [grey(255), (0, 255, 255, 255), grey(0), (255, 0, 0, 255)]),
}
PNG_MODES = ["1", "L", "LA", "P", "I;16", "RGB", "RGBA"]  # what Pillow writes as PNG (and reads back in that mode)


def expected_array(pixels):
    return np.array(square(pixels), dtype=np.uint8)


@pytest.mark.parametrize("mode", list(CASES))
def test_to_rgba_gives_the_expected_pixels_for_every_mode_pillow_reads(mode):
    make, pixels = CASES[mode]
    image = make()
    assert image.mode == mode
    rgba = to_rgba(image)
    assert rgba.mode == "RGBA" and rgba.size == (3, 3)
    np.testing.assert_array_equal(np.asarray(rgba), expected_array(pixels))


@pytest.mark.parametrize("mode", PNG_MODES)
def test_every_png_mode_loads_as_the_expected_rgba_pixels(tmp_path, mode):
    make, pixels = CASES[mode]
    make().save(tmp_path / "x.png")
    png, original_mode, size = load_sprite(tmp_path / "x.png", size=3)
    assert (original_mode, size) == ("I;16" if mode == "I;16B" else mode, (3, 3))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), expected_array(pixels))


def test_a_16_bit_grey_gradient_keeps_its_brightness(small_source):
    """The reported case: a 0..65520 gradient came out with mean 254 (clipped at 255), and the row counted as good."""
    csv_path, images = small_source
    gradient = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(gradient).save(images / "003.png")
    png, mode, _ = load_sprite(images / "003.png")
    pixels = np.asarray(Image.open(io.BytesIO(png)))
    assert mode == "I;16"
    assert abs(pixels[..., 0].mean() - 127.5) < 0.5 and pixels[..., 0].min() == 0 and pixels[..., 0].max() == 255
    np.testing.assert_array_equal(pixels[..., 0], np.rint(gradient / 257).astype(np.uint8))
    assert (pixels[..., 3] == 255).all()
    dataset_dict, report = build_dataset(csv_path, images)
    assert report.image_modes["I;16"] == 1
    row = next(r for split in dataset_dict.values() for r in split if r["national_number"] == "003")
    assert abs(np.asarray(row["image"])[..., 0].mean() - 127.5) < 0.5


@pytest.mark.parametrize("name, data, expected", [
    # 16-bit grey with a tRNS grey value: exactly that 16-bit value is transparent, not its 8-bit neighbours
    ("grey16_trns", png16([[0, 1000, 1001], [65535, 1000, 2570], [0, 0, 0]], 0, trns=[1000]),
     [grey(0), grey(4, 0), grey(4), grey(255), grey(4, 0), grey(10), grey(0), grey(0), grey(0)]),
    ("grey_alpha16", png16(np.full((3, 3, 2), [2570, 32896]), 4), [grey(10, 128)] * 9),
    ("rgb16", png16(np.full((3, 3, 3), [2570, 5140, 65535]), 2), [(10, 20, 255, 255)] * 9),
    ("rgba16", png16(np.full((3, 3, 4), [2570, 5140, 65535, 32896]), 6), [(10, 20, 255, 128)] * 9),
], ids=["grey16_trns", "grey_alpha16", "rgb16", "rgba16"])
def test_16_bit_pngs_of_every_colour_type_load_as_8_bit(tmp_path, name, data, expected):
    (tmp_path / f"{name}.png").write_bytes(data)
    png, _, _ = load_sprite(tmp_path / f"{name}.png", size=3)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), expected_array(expected))


def test_16_bit_rgb_with_a_transparent_colour_is_refused_not_made_opaque(tmp_path):
    """Pillow drops a 16-bit tRNS colour key: the background would silently come out opaque."""
    path = tmp_path / "key.png"
    path.write_bytes(png16(np.full((3, 3, 3), [1000, 2000, 3000]), 2, trns=[1000, 2000, 3000]))
    with pytest.raises(ImageRejected, match="16-bit RGB with a transparent colour") as caught:
        load_sprite(path, size=3)
    assert caught.value.kind == "unsupported image" and str(path) in str(caught.value)


# sizes


def one_bit_png(path, width, height):
    """A valid black 1-bit PNG of any size, written row by row: a 12000x12000 one is an 18 KB file."""
    path.write_bytes(png_bytes(width, height, 1, 0, (bytes((width + 7) // 8) for _ in range(height))))
    return path


@pytest.fixture
def decodes(monkeypatch):
    """Records every image Pillow decodes (ImageFile.load), by size."""
    seen, load = [], ImageFile.ImageFile.load

    def spy(self):
        seen.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen


@pytest.mark.parametrize("width, height", [(4097, 4096), (12000, 12000)])
def test_a_sprite_over_the_pixel_limit_is_refused_before_decoding(tmp_path, decodes, width, height):
    path = one_bit_png(tmp_path / "huge.png", width, height)
    assert width * height > MAX_SPRITE_PIXELS
    with pytest.raises(ImageRejected) as caught:
        load_sprite(path)
    message = str(caught.value)
    assert caught.value.kind == "image too large" and decodes == []
    assert f"{path} is {width}x{height} ({width * height:,} pixels)" in message and "16,777,216 pixels" in message


def test_aspect_ratio_limit_is_inclusive_and_a_4000x1_strip_is_skipped_with_its_reason(small_source, decodes):
    csv_path, images = small_source
    one_bit_png(images / "002.png", 4096, 1024)  # exactly 4:1: kept
    write_sprite(images / "003.png", size=(4000, 1))  # was: a fully transparent 64x64 sprite, "resized"
    one_bit_png(images / "004.png", 1024, 4097)  # just over 4:1
    dataset_dict, report = build_dataset(csv_path, images)
    kinds = {message.split("(")[1][:3]: kind for kind, message in report.skipped}
    assert kinds == {"003": "extreme aspect ratio", "004": "extreme aspect ratio"}
    strip = next(message for _, message in report.skipped if "(003)" in message)
    assert "003.png is 4000x1: beyond the 4:1 aspect ratio limit, it would fill only 64x0 of the 64x64 sprite" in strip
    assert "extreme aspect ratio: 2" in report.summary()
    assert (4000, 1) not in decodes and (1024, 4097) not in decodes
    assert sum(len(ds) for ds in dataset_dict.values()) == 8
    kept = next(r for split in dataset_dict.values() for r in split if r["national_number"] == "002")
    alpha = np.asarray(kept["image"])[..., 3]
    assert alpha[:24].max() == 0 and alpha[24:40].min() == 255  # a 64x16 band, centred


def test_a_blank_sprite_is_skipped_and_fails_strict(small_source):
    csv_path, images = small_source
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(images / "005.png")
    _, report = build_dataset(csv_path, images)
    assert [kind for kind, _ in report.skipped] == ["blank image"]
    assert "005.png is blank: every pixel is fully transparent" in report.skipped[0][1]
    with pytest.raises(DatasetError, match=r"--strict: 1 row\(s\) rejected: .*005.png is blank"):
        build_dataset(csv_path, images, strict=True)


def test_oversized_sprite_under_strict_exits_with_one_line_naming_the_file(tmp_path, capsys):
    images = tmp_path / "small_images"
    images.mkdir()
    write_sprite(images / "001.png")
    one_bit_png(images / "002.png", 12000, 12000)
    csv_path = write_csv(tmp_path / "pokemon.csv", [pokemon_row("001"), pokemon_row("002")])
    with pytest.raises(SystemExit) as exit_:
        prepare_dataset.main(["--csv", str(csv_path), "--images", str(images), "--output", str(tmp_path / "out"), "--strict"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "002.png is 12000x12000 (144,000,000 pixels)" in err and not (tmp_path / "out").exists()
