"""Copies stay equal to their source, as transformers' utils/check_copies.py keeps its copies.

Some code has to exist twice: each metrics/ module is loaded by `evaluate` as one file, so it cannot import a
helper from another file, and generate.py is shipped to a Space without prepare_dataset.py. Such a copy is marked
by a comment on the line above it, at the start of the line:

    # Copied from <file>: <name>[, <name>...] [(why)]

<file> is the source's path from the repository root; the names are the top-level functions, classes or
assignments that follow the marker, in order, and that <file> defines under the same names. A copy must equal its
source (decorators, docstring and comments included) up to whitespace. On a failure, change the source and copy
it again to every place that names it, or make the copy its own code by removing the marker.
"""

import ast
import io
import re
import shutil
import tokenize
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER_START = "# Copied from"
MARKER = re.compile(r"# Copied from (?P<source>[\w./-]+\.py): (?P<names>\w+(?:, \w+)*)(?: \(.+\))?")
SKIPPED_FOLDERS = {"outputs", "data", "__pycache__"}  # what runs write: saved models carry their own code


def python_files(root):
    """The repository's .py files, without hidden folders (virtual environments, .git) and run outputs."""
    return sorted(path for path in root.rglob("*.py")
                  if not any(part.startswith(".") or part in SKIPPED_FOLDERS for part in path.relative_to(root).parts))


def markers(path):
    """[(line number, comment)] of the comments in `path` that start a line with '# Copied from'."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return [(token.start[0], token.string.rstrip()) for token in tokens
            if token.type == tokenize.COMMENT and token.start[1] == 0 and token.string.startswith(MARKER_START)]


def top_level_blocks(path):
    """[(first line, last line, names, source text)] of the top-level statements of `path`, decorators included;
    names: a definition's name or an assignment's target names (none for other statements)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    blocks = []
    for node in ast.parse(text, filename=str(path)).body:
        first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [target.id for target in targets if isinstance(target, ast.Name)]
        else:
            names = []
        blocks.append((first, node.end_lineno, names, "\n".join(lines[first - 1 : node.end_lineno])))
    return blocks


def normalised(code):
    return " ".join(code.split())


def check_copy(root, path, line, comment):
    """The problems of one marked copy in `path` (a marker at `line`), as one-line messages; [] when it is equal."""
    where = f"{path.relative_to(root)}:{line}"
    match = MARKER.fullmatch(comment)
    if not match:
        return [f"{where}: {comment!r} is not '# Copied from <file>: <name>[, <name>...] [(why)]'"]
    source = root / match["source"]
    if not source.is_file():
        return [f"{where}: the source {match['source']} does not exist"]
    names = match["names"].split(", ")
    following = [block for block in top_level_blocks(path) if block[0] > line][: len(names)]
    if [block[2] for block in following] != [[name] for name in names]:
        found = [block[2][0] if block[2] else "?" for block in following]
        return [f"{where}: the marker names {', '.join(names)}, but what follows it is {', '.join(found) or 'nothing'}"]
    if following[0][0] != line + 1:
        return [f"{where}: the copy of {names[0]} must start on the line after the marker"]
    originals = {name: text for _, _, block_names, text in top_level_blocks(source) for name in block_names}
    problems = []
    for name, (_, _, _, text) in zip(names, following):
        if name not in originals:
            problems.append(f"{where}: {match['source']} defines no top-level {name}")
        elif normalised(text) != normalised(originals[name]):
            problems.append(f"{where}: {name} differs from {match['source']}'s {name}; copy it again")
    return problems


def all_markers(root):
    return [(path, line, comment) for path in python_files(root) for line, comment in markers(path)]


# the repository's copies


def marker_id(marker):
    path, line, comment = marker
    match = MARKER.fullmatch(comment)
    return f"{path.relative_to(REPO_ROOT)}:{match['names'].replace(', ', ',') if match else line}"


@pytest.mark.parametrize("marker", all_markers(REPO_ROOT), ids=marker_id)
def test_every_marked_copy_equals_its_source(marker):
    path, line, comment = marker
    assert check_copy(REPO_ROOT, path, line, comment) == []


def test_the_known_copies_are_marked():
    """The scan finds the copies this project depends on (a scan that finds nothing passes every check above)."""
    found = {(str(path.relative_to(REPO_ROOT)), MARKER.fullmatch(comment)["names"])
             for path, _, comment in all_markers(REPO_ROOT) if MARKER.fullmatch(comment)}
    for module in ("frechet", "diversity", "memorisation", "reconstruction"):
        assert (f"metrics/{module}/{module}.py", "on_white") in found
    for module in ("diversity", "memorisation", "reconstruction"):
        assert (f"metrics/{module}/{module}.py", "composite_on_white") in found
    assert ("metrics/diversity/diversity.py", "COLOUR_WEIGHT, LAYOUT_WEIGHT, EDGE_WEIGHT, FEATURE_BATCH") in found
    assert ("generate.py", "write_probe") in found


# the check itself: a copy that drifts fails


@pytest.fixture
def tree(tmp_path):
    """A copy of the files of two real copies (metrics/diversity's from attention_maps.py and metrics/frechet)."""
    for name in ("attention_maps.py", "metrics/frechet/frechet.py", "metrics/diversity/diversity.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    return tmp_path


def problems(root):
    return [problem for path, line, comment in all_markers(root) for problem in check_copy(root, path, line, comment)]


def edit(path, old, new):
    text = path.read_text(encoding="utf-8")
    assert text.count(old) >= 1, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_unchanged_copies_pass(tree):
    assert len(all_markers(tree)) >= 6
    assert problems(tree) == []


def test_a_changed_line_in_a_copy_fails_naming_it(tree):
    diversity = tree / "metrics/diversity/diversity.py"
    edit(diversity, "    return rgb * alpha + (1 - alpha)\n", "    return rgb * alpha + (0.9 - alpha)\n")
    (problem,) = problems(tree)
    assert problem.startswith("metrics/diversity/diversity.py:")
    assert problem.endswith("on_white differs from attention_maps.py's on_white; copy it again")


def test_a_changed_source_fails_in_every_copy(tree):
    edit(tree / "metrics/frechet/frechet.py", "FEATURE_BATCH = 256\n", "FEATURE_BATCH = 128\n")
    (problem,) = problems(tree)
    assert "FEATURE_BATCH differs from metrics/frechet/frechet.py's FEATURE_BATCH" in problem
    edit(tree / "attention_maps.py", "    if images.shape[1] == 3:\n", "    if images.shape[1] != 4:\n")
    assert sum("on_white differs" in p for p in problems(tree)) == 2  # frechet's copy and diversity's


def test_whitespace_alone_is_no_difference(tree):
    edit(tree / "metrics/diversity/diversity.py", "    return rgb * alpha + (1 - alpha)\n",
         "    return rgb  *  alpha + (1 - alpha)   \n")
    assert problems(tree) == []


def test_a_marker_must_name_what_follows_it_and_what_its_source_defines(tree):
    diversity = tree / "metrics/diversity/diversity.py"
    edit(diversity, "# Copied from metrics/frechet/frechet.py: sprite_features\n",
         "# Copied from metrics/frechet/frechet.py: sprite_feature\n")
    (problem,) = problems(tree)
    assert problem.endswith("the marker names sprite_feature, but what follows it is sprite_features")
    edit(diversity, "# Copied from metrics/frechet/frechet.py: sprite_feature\n",
         "# Copied from metrics/frechet/frechet.py\n")
    (problem,) = problems(tree)
    assert "is not '# Copied from <file>: <name>" in problem
    edit(diversity, "# Copied from metrics/frechet/frechet.py\n", "# Copied from metrics/frechet/frechets.py: sprite_features\n")
    (problem,) = problems(tree)
    assert problem.endswith("the source metrics/frechet/frechets.py does not exist")


def test_a_copy_that_lost_one_of_its_names_fails(tree):
    edit(tree / "metrics/diversity/diversity.py", "EDGE_WEIGHT = 175.6\n", "")
    (problem,) = problems(tree)
    assert "the marker names COLOUR_WEIGHT, LAYOUT_WEIGHT, EDGE_WEIGHT, FEATURE_BATCH, but what follows it is " \
           "COLOUR_WEIGHT, LAYOUT_WEIGHT, FEATURE_BATCH, PAIR_CHUNK" in problem
