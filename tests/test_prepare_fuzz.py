"""Fuzzing the CSV reader and caption templates: a clear DatasetError or a valid dataset, nothing else."""
import csv
import io
import tempfile
from pathlib import Path

import pytest
from conftest import pokemon_row, write_sprite
from datasets import load_from_disk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prepare_dataset
from prepare_dataset import DatasetError, prepare

# derandomize: the same examples on every run, so CI is reproducible; database=None: no .hypothesis/ folder.
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
HEADER = "national_number,english_name,description,color,shape,generation\n"
ODD_TEXT = st.text(alphabet=st.sampled_from(list('ab ,"\'\n\r\t{}/\\.é♀’\u200b\x00😀') + ["\u202e"]), max_size=30)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_images")
    for number in ("001", "002", "003", "004"):
        write_sprite(folder / f"{number}.png")
    return folder


def prepare_or_error(csv_bytes, images, **kwargs):
    """Run the whole pipeline in a fresh folder; check the all-or-nothing contract either way."""
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, output = Path(tmp) / "pokemon.csv", Path(tmp) / "out"
        csv_path.write_bytes(csv_bytes)
        try:
            prepare(csv_path, images, output, **kwargs)
        except DatasetError as e:
            assert str(e).strip()
            assert sorted(p.name for p in Path(tmp).iterdir()) == ["pokemon.csv"]  # nothing half-written
            return None
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["out", "pokemon.csv"]
        loaded = load_from_disk(str(output))
        for split in loaded.values():
            assert all(text and text.strip() for text in split["text"])
            assert all(split.features[c].dtype == "string" for c in prepare_dataset.REQUIRED_COLUMNS)
        return loaded


@FUZZ
@given(body=st.binary(max_size=300), with_header=st.booleans())
def test_random_bytes_give_a_clear_error_or_a_valid_dataset(images, body, with_header):
    prepare_or_error((HEADER.encode() if with_header else b"") + body, images)


@FUZZ
@given(rows=st.lists(st.tuples(st.sampled_from(["001", "002", "003", "004", "005", "", "../001", "/001", "a/b", "0 1"]),
                               ODD_TEXT, ODD_TEXT, ODD_TEXT, st.sampled_from(["1", "", "x", "007", "-3"])), max_size=6),
       quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC, "raw"]))
def test_odd_quoting_and_unicode_give_a_clear_error_or_a_valid_dataset(images, rows, quoting):
    if quoting == "raw":  # no escaping at all: stray quotes, commas and newlines break the structure
        text = HEADER + "".join(",".join([n, name, desc, color, "ball", gen]) + "\n" for n, name, desc, color, gen in rows)
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, quoting=quoting)
        writer.writerow(HEADER.strip().split(","))
        writer.writerows([n, name, desc, color, "ball", gen] for n, name, desc, color, gen in rows)
        text = buffer.getvalue()
    loaded = prepare_or_error(text.encode("utf-8"), images)
    if loaded is not None and quoting != "raw":  # a well-quoted file round-trips every kept value
        kept = {r[0]: r for r in rows}
        for split in loaded.values():
            for row in split:
                assert row["description"] == kept[row["national_number"]][2].strip()


TEMPLATE_PARTS = st.sampled_from(["{color}", "{shape}", "{types}", "{description}", "{english_name}", "{nope}", "{",
                                  "}", "{{", "}}", "{0}", "{}", "{color!r}", "{color:>5}", "{description.__doc__}",
                                  "{color[0]}", " ", ".", ",", "A ", "é", "\n"])


@FUZZ
@given(template=st.one_of(st.lists(TEMPLATE_PARTS, max_size=8).map("".join), st.text(max_size=40)))
def test_caption_templates_render_or_raise_a_clear_error(template):
    columns = ["national_number", "english_name", "description", "primary_type", "secondary_type", "color", "shape"]
    try:
        prepare_dataset.check_template(template, columns)
    except DatasetError as e:
        assert "caption template" in str(e)
        return
    for row in (pokemon_row("001"), pokemon_row("002", color="", secondary_type="")):
        caption = prepare_dataset.make_caption(template, {c: row[c] for c in columns})
        assert isinstance(caption, str) and "None" not in caption and caption == caption.strip()


@FUZZ
@given(template=st.lists(TEMPLATE_PARTS, min_size=1, max_size=5).map("".join))
def test_caption_template_through_the_pipeline(images, template):
    rows = "".join(f"{n},Mon,Desc {n},red,ball,1\n" for n in ("001", "002", "003"))
    prepare_or_error((HEADER + rows).encode(), images, caption_template=template)


@pytest.mark.parametrize("size, ok", [(100_000, True), (200_000, False)])
def test_huge_field_is_kept_or_rejected_with_its_line(images, size, ok):
    csv_bytes = (HEADER + f'001,Mon,"{"x" * size}",red,ball,1\n002,Mon,Short,red,ball,1\n').encode()
    loaded = prepare_or_error(csv_bytes, images)
    if ok:
        assert max(len(d) for split in loaded.values() for d in split["description"]) == size
    else:
        assert loaded is None
        with pytest.raises(DatasetError, match="line 2: unreadable CSV .*field larger than field limit"):
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "p.csv").write_bytes(csv_bytes)
                prepare_dataset.load_rows(Path(tmp) / "p.csv")
