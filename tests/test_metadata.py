"""What a model shares is about the model, not about the machine that made it, and its licence is its data's.

- config.json names the BERT a model started from by its Hub id, or a local folder by its bare name: never a path.
- The model card (train_accelerate.save_model_card) is a huggingface_hub ModelCard: the dataset's licence (from the
  dataset's own card), the validation loss as an eval result, samples.png as the text-to-image widget gallery, a
  usage snippet that pins one revision for the model and the tokenizer, and no local path.
- Xet is left to the user: importing the scripts does not turn it off.

The trained run's folder is checked the same way in tests/test_train.py, the pushed repo in test_hub_roundtrip.py.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard, ModelCard

import prepare_dataset
import train_accelerate
from modeling_pokesprite import PokeSpriteModel
from settings_pokesprite import load_settings
from test_generate import MINILM, TINY, save_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
PROMPTS = ["a small blue water turtle", "a red fire lizard"]


def tiny_cfg(hub_model_id=None):
    return load_settings(REPO_ROOT / "tests" / "configs" / "tiny.yaml", hub_model_id=hub_model_id)


def files_mentioning(folder, text):
    """Files under `folder` whose bytes contain `text`."""
    return [p.name for p in Path(folder).rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


# config.json


def test_config_names_a_local_text_encoder_by_its_folder_name_not_its_path(tmp_path):
    folder = tmp_path / "model"
    save_tiny_model(folder)

    config = json.loads((folder / "config.json").read_text())
    assert config["model_name"] == MINILM.name
    assert config["text_config"]["_name_or_path"] == MINILM.name
    # no file of the saved model holds the text encoder's path, nor any path of this Python installation
    assert files_mentioning(folder, str(MINILM.parent)) == []
    assert files_mentioning(folder, "site-packages") == []
    assert PokeSpriteModel.from_pretrained(folder).config.model_name == MINILM.name


def test_a_hub_cache_snapshot_is_named_by_its_hub_id(tmp_path):
    # the layout huggingface_hub downloads into: models--<org>--<name>/snapshots/<commit>/<file> (symlinks to blobs)
    snapshot = tmp_path / "hub" / f"models--{MINILM_ID.replace('/', '--')}" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        (snapshot / name).symlink_to(MINILM / name)

    model = PokeSpriteModel.from_text_encoder(snapshot, **TINY)
    assert model.config.model_name == model.config.text_config._name_or_path == MINILM_ID
    # a plain local copy of a Hub model: the caller names it
    named = PokeSpriteModel.from_text_encoder(MINILM, model_name=MINILM_ID, **TINY)
    assert named.config.model_name == named.config.text_config._name_or_path == MINILM_ID

    dataset_snapshot = tmp_path / "hub" / "datasets--someone--sprites" / "snapshots" / ("cd" * 20)
    dataset_snapshot.mkdir(parents=True)
    assert PokeSpriteModel.shareable_name(dataset_snapshot) == "someone/sprites"
    assert PokeSpriteModel.shareable_name(MINILM_ID) == MINILM_ID  # a Hub id, as it is
    assert PokeSpriteModel.shareable_name(tmp_path / "hub") == "hub"


# the model card


@pytest.fixture(scope="module")
def datasets_with_cards(tmp_path_factory):
    """The same 12 rows saved three times: with the card prepare_dataset writes for synthetic data (MIT), with the
    one it writes for CSV + sprite data (the Pokémon: `other`, pokemon-fan-content), and with no card at all."""
    root = tmp_path_factory.mktemp("datasets")
    splits, report = prepare_dataset.build_synthetic_dataset(12, seed=0)
    cards = {
        "synthetic": prepare_dataset.dataset_card(splits, report=report, synthetic=True),
        "pokemon": prepare_dataset.dataset_card(splits, source="pokemon.csv", images="small_images", report=report),
        "uncarded": None,
    }
    return {name: prepare_dataset.save_dataset(splits, root / name, card=card) for name, card in cards.items()}


def write_card(output_dir, dataset, text_encoder=MINILM, hub_model_id=None, prompts=PROMPTS, val_loss=0.25):
    output_dir.mkdir(parents=True, exist_ok=True)
    train_accelerate.save_model_card(output_dir, tiny_cfg(hub_model_id), {"step": 4, "val_loss": val_loss}, str(dataset),
                                     str(text_encoder), prompts=prompts)
    return ModelCard.load(output_dir / "README.md"), (output_dir / "README.md").read_text()


@pytest.mark.parametrize("dataset, licence", [
    ("synthetic", {"license": "mit"}),
    ("pokemon", {"license": "other", "license_name": prepare_dataset.POKEMON_LICENSE_NAME}),
    ("uncarded", {"license": "unknown"}),
])
def test_model_card_carries_the_licence_of_the_dataset_card(datasets_with_cards, dataset, licence, tmp_path):
    card, text = write_card(tmp_path / "model", datasets_with_cards[dataset])

    metadata = card.data.to_dict()
    assert {k: metadata.get(k) for k in ("license", "license_name")} == {"license_name": None, **licence}
    licence_section = text.split("## Licence")[1].split("## ")[0]
    assert f"`{licence['license']}`" in licence_section or licence["license"] == "unknown" and "Unknown" in licence_section
    pokemon = "Pokémon and its artwork are © Nintendo"
    assert (pokemon in text) == (dataset == "pokemon")  # the Pokémon notice only for Pokémon data


def test_model_card_lists_the_validation_loss_the_widget_and_pins_one_revision(datasets_with_cards, tmp_path):
    card, text = write_card(tmp_path / "model", datasets_with_cards["synthetic"], hub_model_id="someone/pokesprite",
                            val_loss=0.123456)

    assert card.data.pipeline_tag == "text-to-image" and card.data.library_name == "transformers"
    assert card.data.widget == [{"text": " | ".join(PROMPTS), "output": {"url": "samples.png"}}]
    assert card.data.model_name == "someone/pokesprite"
    [result] = card.data.eval_results
    assert (result.task_type, result.dataset_name, result.dataset_split) == ("text-to-image", "synthetic", "validation")
    assert (result.metric_type, result.metric_value) == ("val_loss", 0.123456)
    assert "| val_loss | 0.1235 |" in text and "| step | 4 |" in text
    for section in ("## Use", "## Training", "## Results", "## Licence", "## Limitations"):
        assert section in text, section
    # local folders: no Hub metadata for them, their bare names in the text, and no path of this machine
    assert card.data.datasets is None and card.data.base_model is None
    assert "- dataset: `synthetic` (a local folder)" in text and f"- text encoder: `{MINILM.name}`" in text
    for path in (str(datasets_with_cards["synthetic"]), str(MINILM), str(tmp_path), "site-packages"):
        assert path not in text, path

    # the usage snippet loads the model and its tokenizer from the same pinned revision
    [snippet] = re.findall(r"```python\n(.*?)```", text, re.S)
    assert 'revision = "<commit sha>"' in snippet
    assert 'AutoModel.from_pretrained("someone/pokesprite", trust_remote_code=True, revision=revision)' in snippet
    assert 'AutoTokenizer.from_pretrained("someone/pokesprite", trust_remote_code=True, revision=revision)' in snippet


def test_model_card_of_hub_data_and_a_hub_encoder_names_them_and_reads_the_hub_dataset_card(tmp_path, monkeypatch):
    asked = []

    def load(repo_id_or_path, repo_type=None, **kwargs):  # the Hub, without the network
        asked.append((str(repo_id_or_path), repo_type))
        return DatasetCard("---\nlicense: cc-by-4.0\n---\n\n# someone/sprites\n")

    monkeypatch.setattr(DatasetCard, "load", load)
    card, text = write_card(tmp_path / "model", "someone/sprites", text_encoder=MINILM_ID, prompts=None)

    assert asked == [("someone/sprites", "dataset")]
    assert card.data.license == "cc-by-4.0" and card.data.datasets == ["someone/sprites"]
    assert card.data.base_model == MINILM_ID
    assert card.data.get("widget") is None  # no prompts, no gallery
    assert "- dataset: `someone/sprites`\n" in text


# Xet


def test_importing_the_scripts_leaves_xet_on(tmp_path):
    """The scripts do not turn Xet off for their users (the tests do, in conftest.py, for the local mirror)."""
    code = ("import json, os, prepare_dataset, train_accelerate; from huggingface_hub import constants; "
            "print(json.dumps([os.environ.get('HF_HUB_DISABLE_XET'), constants.HF_HUB_DISABLE_XET]))")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [None, False]
