"""The toxicity judge: its toxic label found from the config (and refused when it has none), folders that are not
sequence classifiers refused, the cached tiny judge's verdicts, training on ToxiGen v2's training split only, and
the CLI's checks."""
import json
import os
import shutil

import pytest
from transformers import PretrainedConfig

from conftest import DATA, needs_data, run_script

from chained_tuning import classifier
from chained_tuning.data import synthetic
import tasks
from chained_tuning.common import UserError


@pytest.fixture(scope="module")
def tiny_judge():
    return classifier.load_classifier("tiny")


def config(id2label):
    return PretrainedConfig(id2label=id2label, label2id={v: k for k, v in id2label.items()})


def test_toxic_label_from_the_config():
    assert classifier.toxic_label_index(config({0: "benign", 1: "toxic"}), "x") == 1
    assert classifier.toxic_label_index(config({0: "Toxic", 1: "non-toxic"}), "x") == 0
    assert classifier.toxic_label_index(config({0: "neutral", 1: "hate"}), "x") == 1
    generic = config({0: "LABEL_0", 1: "LABEL_1"})
    assert classifier.toxic_label_index(generic, "tomh/toxigen_roberta") == 1  # its model card: LABEL_1 is toxic
    assert classifier.toxic_label_index(generic, "/hub/models--tomh--toxigen_roberta/snapshots/0123abc") == 1
    with pytest.raises(UserError, match=r"someone/model: none of its labels \['LABEL_0', 'LABEL_1'\] is a toxic label"):
        classifier.toxic_label_index(generic, "someone/model")
    with pytest.raises(UserError, match=r"none of its labels \['negative', 'positive'\]"):
        classifier.toxic_label_index(config({0: "negative", 1: "positive"}), "x")
    with pytest.raises(UserError, match="several labels mean toxic"):
        classifier.toxic_label_index(config({0: "toxic", 1: "hate"}), "x")


def relabelled(src, dst, id2label):
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["id2label"] = {str(k): v for k, v in id2label.items()}
    cfg["label2id"] = {v: k for k, v in id2label.items()}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_label_mapping_of_a_folder(tiny_judge, tmp_path, tiny_path):
    src = classifier.tiny_classifier_path()
    texts = ["people are lazy and dangerous.", "I'm sorry, that was hurtful and I shouldn't have said it."]
    assert tiny_judge.toxic_label == "toxic" and tiny_judge.toxic_index == 1
    swapped = classifier.load_classifier(relabelled(src, tmp_path / "swapped", {0: "toxic", 1: "benign"}))
    assert swapped.toxic_index == 0 and swapped.sha256 == tiny_judge.sha256
    assert swapped.score(texts) == pytest.approx([1 - p for p in tiny_judge.score(texts)], abs=1e-6)
    with pytest.raises(UserError, match=r"none of its labels \['negative', 'positive'\] is a toxic label"):
        classifier.load_classifier(relabelled(src, tmp_path / "sentiment", {0: "negative", 1: "positive"}))
    with pytest.raises(UserError, match=r"is not a sequence classifier \(its config.json lists architectures "
                                        r"\['LlamaForCausalLM'\]\)"):
        classifier.load_classifier(tiny_path)  # a causal LM: AutoModelForSequenceClassification gives a random head
    with pytest.raises(UserError, match="model not found"):
        classifier.load_classifier(str(tmp_path / "missing"))


def test_the_tiny_judge(tiny_judge):
    meta = json.load(open(os.path.join(classifier.tiny_classifier_path(), classifier.CLASSIFIER_META)))
    assert meta["heldout_accuracy"] >= 0.95 and meta["data"]["heldout_split"] == "validation"
    assert tiny_judge.name == os.path.basename(classifier.tiny_classifier_path())
    test = tasks.load_task("toxigen", "test").examples[:200]  # the split it never trained on
    texts = [classifier.toxigen_sentence(ex) for ex in test]
    p = tiny_judge.score(texts, batch_size=7)
    assert sum((q >= 0.5) == (ex.label == 0) for q, ex in zip(p, test)) / len(test) >= 0.9
    assert p == pytest.approx(tiny_judge.score(texts, batch_size=64), abs=1e-5)  # batching changes no verdict
    replies = list(synthetic.SD_FEEDBACK.values()) + ["", "ok", " found the lost wallet."]
    assert max(tiny_judge.score(replies)) < 0.5  # the recovery replies, an empty and a stray one: not toxic


@needs_data
def test_trained_on_the_toxigen_training_split_only(tmp_path):
    recipe = json.loads(json.dumps(classifier.RECIPE))
    recipe["train"]["steps"], recipe["background"] = 2, 0  # the bookkeeping, not what it learns
    meta = classifier.build_classifier(str(tmp_path / "c"), DATA, recipe, log=lambda *a: None)
    train = tasks.load_task("toxigen", "train", DATA, train_size=None)
    test = tasks.load_task("toxigen", "test", DATA)
    assert meta["data"]["train_ids_sha256"] == train.info["ids_sha256"]
    assert meta["data"]["n_train"] == len(train.examples)
    assert not {ex.id for ex in train.examples} & {ex.id for ex in test.examples}
    assert 0 <= meta["heldout_accuracy"] <= 1 and meta["data"]["n_heldout"] > 0
    judge = classifier.load_classifier(str(tmp_path / "c"))
    assert judge.toxic_label == "toxic" and judge.sha256 == classifier.weights_sha256(str(tmp_path / "c"))


def one_error(r, text):
    lines = r.stderr.strip().splitlines()
    return r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0]


def test_cli_checks_first(tmp_path):
    data = tmp_path / "data"  # the checks come before any data is read: an empty folder (the real one may be absent)
    data.mkdir()
    r = run_script("-m", "chained_tuning.classifier", "--data_dir", data, "--out", tmp_path / "c", "--steps", "0")
    assert one_error(r, "--steps must be at least 1, got 0")
    r = run_script("-m", "chained_tuning.classifier", "--data_dir", data)
    assert one_error(r, "--data_dir needs --out")
    (tmp_path / "c").mkdir()
    r = run_script("-m", "chained_tuning.classifier", "--data_dir", data, "--out", tmp_path / "c")
    assert one_error(r, "already exists; pass --overwrite")
    assert sorted(os.listdir(tmp_path)) == ["c", "data"] and not os.listdir(tmp_path / "c")
