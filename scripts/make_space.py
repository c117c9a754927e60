#!/usr/bin/env python
"""Write a ready Hugging Face Space (Gradio) for the web demo of a PokeSprite model on the Hub.

    python scripts/make_space.py --model <user>/pokesprite --out space/
    python scripts/make_space.py --model <user>/pokesprite --revision <commit> --out space/   # pin the model

The folder holds:

- `README.md`: the Space's card, YAML front matter `sdk: gradio`, `sdk_version` (the Gradio that
  requirements-app.txt pins and the tests drive), `app_file: app.py`, `models: [<model>]`;
- `app.py` and the repository's modules it imports, found by reading their imports (`generate.py`,
  `attention_maps.py`, and `configuration_pokesprite.py`, whose ranges generate.py checks), copied unchanged;
- `requirements.txt`: the packages those files and the model's own code (`modeling_pokesprite.py`, which
  `trust_remote_code` runs from the model repo) import, pinned as requirements.txt pins them, Gradio left out
  (the Space installs `sdk_version`);
- `space_config.json`: the model id (and revision), app.py's default when POKESPRITE_MODEL is not set.

Upload it with `hf repos create <user>/<space> --type space --space-sdk gradio` and
`hf upload <user>/<space> space/ --type space`.
"""

import argparse
import ast
import importlib.metadata
import json
import re
import shutil
import sys
from pathlib import Path

import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = "app.py"
# the model's own code, run from the model repo with trust_remote_code: its imports must be installed in the Space
MODEL_CODE = ("modeling_pokesprite.py", "configuration_pokesprite.py")
CONFIG_NAME = "space_config.json"  # read by app.py (app.SPACE_CONFIG)
PROVIDED_BY_SPACE = {"gradio"}  # installed by the Space itself, at sdk_version


class SpaceError(Exception):
    """A problem with the command's input; its message is the one line the user sees."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model's Hub id, <user>/<name>: the Space's default model")
    parser.add_argument("--revision", help="the model's branch, tag or commit to load (pin a commit to pin its code)")
    parser.add_argument("--out", default="space", help="the folder to write (default: %(default)s)")
    parser.add_argument("--title", default="PokeSprite", help="the Space's title (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --out")
    return parser.parse_args(argv)


def check_model_id(model):
    if Path(model).exists():
        raise SpaceError(f"--model {model} is a local folder; a Space loads its model from the Hub: push it "
                         f"(train_accelerate.py --push_to_hub --hub_model_id <user>/<name>) and pass that id")
    try:
        validate_repo_id(model)
    except HFValidationError as e:
        raise SpaceError(f"--model {model!r} is not a Hub model id ({str(e).splitlines()[0]})")


def top_level_imports(path):
    """The top-level names of every module `path` imports, wherever the import statement is (relative ones aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def app_files(root=REPO_ROOT, start=APP):
    """`start` and the repository's modules it imports, directly or through each other, and the third-party
    (not standard library, not local) top-level module names they import."""
    files, third_party, todo = [], set(), [start]
    while todo:
        name = todo.pop()
        if name in files:
            continue
        files.append(name)
        for module in top_level_imports(root / name):
            if (root / f"{module}.py").is_file():
                todo.append(f"{module}.py")
            elif module not in sys.stdlib_module_names:
                third_party.add(module)
    return sorted(files, key=lambda f: (f != start, f)), third_party


def read_pins(path):
    """{canonical name: Requirement} of a requirements file's lines (comments, options and blanks skipped)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = requirement
    return pins


def distributions(modules):
    """The distribution names that provide the import names `modules` (PIL -> pillow), from what is installed."""
    provided = importlib.metadata.packages_distributions()
    names = set()
    for module in modules:
        found = provided.get(module)
        if not found:
            raise SpaceError(f"cannot tell which package provides the module {module!r}: install the project's "
                             f"requirements (pip install -r requirements.txt) and run this again")
        names.update(canonicalize_name(name) for name in found)
    return names


def gradio_version(root=REPO_ROOT):
    requirement = read_pins(root / "requirements-app.txt").get("gradio")
    pinned = [spec.version for spec in requirement.specifier if spec.operator == "=="] if requirement else []
    if not pinned:
        raise SpaceError("requirements-app.txt does not pin gradio (gradio==X.Y.Z): the Space's sdk_version comes from it")
    return pinned[0]


def space_requirements(third_party, root=REPO_ROOT):
    """requirements.txt lines for the Space: the packages its files and the model's code import, as pinned in the
    project's requirements.txt (or unpinned where it does not pin them), Gradio left to the Space."""
    modules = set(third_party)
    for name in MODEL_CODE:
        modules |= {m for m in top_level_imports(root / name)
                    if m not in sys.stdlib_module_names and not (root / f"{m}.py").is_file()}
    pins = read_pins(root / "requirements.txt")
    lines = []
    for name in sorted(distributions(modules) - PROVIDED_BY_SPACE):
        lines.append(str(pins[name]) if name in pins else name)
    return lines


def card(model, revision, title, sdk_version):
    front_matter = {
        "title": title,
        "emoji": "🐉",
        "colorFrom": "red",
        "colorTo": "yellow",
        "sdk": "gradio",
        "sdk_version": sdk_version,
        "python_version": "3.11",
        "app_file": APP,
        "models": [model],
        "pinned": False,
        "license": "mit",
        "short_description": "Pokémon-style pixel sprites from a text description",
    }
    pinned = f" at revision `{revision}`" if revision else ""
    return (f"---\n{yaml.safe_dump(front_matter, sort_keys=False, allow_unicode=True)}---\n\n# {title}\n\n"
            f"A description goes in, Pokémon-style sprites come out, with the model's per-word attention heatmaps.\n\n"
            f"Model: [{model}](https://huggingface.co/{model}){pinned}, loaded with `trust_remote_code=True` (its own "
            f"`modeling_pokesprite.py` runs). To serve another one, set the Space variable `POKESPRITE_MODEL` (and "
            f"`POKESPRITE_REVISION`) or edit `{CONFIG_NAME}`.\n\n"
            f"Written by `scripts/make_space.py` of PokeSprite; the files are the project's `app.py` and the modules it "
            f"imports, unchanged.\n")


def make_space(model, out, revision=None, title="PokeSprite", overwrite=False, root=REPO_ROOT):
    """Write the Space folder `out`; returns the paths written."""
    check_model_id(model)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SpaceError(f"--out {out} exists and is not an empty folder; pass --overwrite to write into it")
    files, third_party = app_files(root)
    contents = {name: (root / name).read_bytes() for name in files}
    contents["requirements.txt"] = ("\n".join(space_requirements(third_party, root)) + "\n").encode()
    contents["README.md"] = card(model, revision, title, gradio_version(root)).encode()
    contents[CONFIG_NAME] = (json.dumps({"model": model, "revision": revision}, indent=2) + "\n").encode()
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in contents.items():
            (out / name).write_bytes(data)
            written.append(out / name)
    except OSError as e:
        raise SpaceError(f"cannot write the Space to {out}: {e.strerror or e}")
    for name in files:  # keep the scripts executable where they were
        shutil.copymode(root / name, out / name)
    return written


def main(argv=None):
    args = parse_args(argv)
    written = make_space(args.model, args.out, args.revision, args.title, args.overwrite)
    for path in written:
        print(f"wrote {path}")
    space = re.sub(r"[^A-Za-z0-9._-]+", "-", args.model.split("/")[-1]) + "-demo"
    print(f"upload it: hf repos create <user>/{space} --type space --space-sdk gradio && "
          f"hf upload <user>/{space} {args.out} --type space")
    return written


if __name__ == "__main__":
    try:
        main()
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
