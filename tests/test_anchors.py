import os
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from gigpo_rllib.anchors import (anchor_id, anchor_ids, canonicalize, dense_anchor_labels, group_similar_texts,
                                  hash_canonical)


def test_canonicalize_folds_formatting_noise():
    messy = "\r\n\n  P  _\t_ \r\n\r\n\r\n\n_   G  \n\n"
    assert canonicalize(messy) == "P _ _\n\n_ G"


def test_canonicalize_keeps_content_differences():
    assert canonicalize("P _\n_ G") != canonicalize("P _ _ G")
    assert canonicalize("a b") != canonicalize("ab")


def test_canonicalize_unicode_normal_form():
    assert canonicalize("caf\u00e9") == canonicalize("cafe\u0301")


def test_strip_function_removes_volatile_parts():
    def drop_turn(text):
        return "\n".join(line for line in text.split("\n") if not line.startswith("Turn"))

    a = anchor_id("Turn 3\nP _\n_ G", drop_turn)
    b = anchor_id("Turn 7\r\nP  _\n_ G", drop_turn)
    assert a == b
    assert a != anchor_id("Turn 3\nP _\n_ G")


def test_strip_function_must_return_text():
    with pytest.raises(TypeError, match="strip function must return str"):
        canonicalize("x", lambda text: None)


def test_non_text_is_rejected():
    with pytest.raises(TypeError, match="text must be str"):
        canonicalize(b"bytes")


def test_64_bit_ids_are_signed_views_of_xxh3():
    text = "P _\n_ G"
    unsigned = xxhash.xxh3_64_intdigest(text.encode())
    expected = unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned
    assert anchor_id(text) == expected
    assert -(1 << 63) <= anchor_id(text) < (1 << 63)


def test_128_bit_ids():
    text = "P _\n_ G"
    wide = anchor_id(text, bits=128)
    assert wide == xxhash.xxh3_128_intdigest(text.encode())
    assert 0 <= wide < 1 << 128


def test_unsupported_width_is_an_error():
    with pytest.raises(ValueError, match="bits must be one of"):
        hash_canonical("x", bits=32)


def test_ids_are_stable_across_processes():
    texts = ["P _\n_ G", "# # #\n# P #", "ünïcödé √"]
    code = "from gigpo_rllib.anchors import anchor_ids; import sys; print(anchor_ids(sys.argv[1:]).tolist())"
    outputs = set()
    for salt in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=salt)
        result = subprocess.run([sys.executable, "-c", code, *texts], env=env, capture_output=True, text=True, check=True)
        outputs.add(result.stdout.strip())
    assert outputs == {str(anchor_ids(texts).tolist())}


def test_batch_matches_single_and_dtype():
    texts = ["a", "b", " a ", "c\r\n"]
    ids = anchor_ids(texts)
    assert ids.dtype == np.int64 and ids.shape == (4,)
    assert list(ids) == [anchor_id(t) for t in texts]
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert anchor_ids([]).shape == (0,)
    wide = anchor_ids(texts, bits=128)
    assert wide == [anchor_id(t, bits=128) for t in texts]


def test_dense_labels_preserve_equality():
    wide = [anchor_id(t, bits=128) for t in ["x", "y", "x", "z", "y"]]
    assert dense_anchor_labels(wide).tolist() == [0, 1, 0, 2, 1]


def test_similar_texts_join_the_first_close_representative():
    texts = ["room A (noise 1)", "room A (noise 2)", "room B, another place", "room A (noise 1)"]
    assert group_similar_texts(texts, 0.9).tolist() == [0, 0, 2, 0]
    assert group_similar_texts(texts, 1.0).tolist() == [0, 1, 2, 0]  # exact duplicates only


def test_similarity_grouping_bad_threshold():
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        group_similar_texts(["a"], 0.0)
