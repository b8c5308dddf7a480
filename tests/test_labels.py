import pytest

from service.labels import LABEL_SETS, RAW_LABEL_MAPS, UnknownLabelError, label_set, map_label


def test_label_sets_keep_instructerc_order_and_spelling():
    assert LABEL_SETS["meld"] == ("neutral", "surprise", "fear", "sad", "joyful", "disgust", "angry")
    assert LABEL_SETS["iemocap"] == ("happy", "sad", "neutral", "angry", "excited", "frustrated")
    assert LABEL_SETS["emorynlp"] == ("Joyful", "Mad", "Peaceful", "Neutral", "Sad", "Powerful", "Scared")


@pytest.mark.parametrize(
    ("dataset", "raw", "label"),
    [
        ("meld", "joy", "joyful"),
        ("meld", "anger", "angry"),
        ("meld", "sadness", "sad"),
        ("meld", "neutral", "neutral"),
        ("dailydialog", "happiness", "joyful"),
        ("dailydialog", "sadness", "sad"),
        ("dailydialog", "anger", "angry"),
        ("dailydialog", "fear", "fear"),
        ("emorynlp", "Peaceful", "Peaceful"),
    ],
)
def test_raw_names_map_onto_instructerc_labels(dataset, raw, label):
    assert map_label(dataset, raw) == label


@pytest.mark.parametrize("dataset", ["meld", "dailydialog", "iemocap", "emorynlp"])
def test_every_map_is_onto_its_label_set(dataset):
    target = LABEL_SETS["meld" if dataset == "dailydialog" else dataset]
    assert sorted(set(RAW_LABEL_MAPS[dataset].values())) == sorted(target)


def test_unknown_label_is_refused_with_the_known_names():
    with pytest.raises(UnknownLabelError, match="'happy'.*joy"):
        map_label("meld", "happy")
    with pytest.raises(KeyError, match="unknown label set 'nope'"):
        label_set("nope")
