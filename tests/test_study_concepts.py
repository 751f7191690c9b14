"""Concept mutual information (study/concepts.py) on hand-made routing and labels with known answers."""

import numpy as np
import pytest
from modalmoe.study import concepts as sc


def test_binary_mi_known_values():
    a = np.array([1, 1, 0, 0], bool)
    assert sc.binary_mi_bits(a, a) == pytest.approx(1.0)  # H = 1 bit, fully shared
    assert sc.binary_mi_bits(a, np.array([1, 0, 1, 0], bool)) == pytest.approx(0.0, abs=1e-12)
    # p(a=1)=.5; b=1 only when a=1, half the time: I = H(b) − H(b|a) = H(.25) − ½·1 = 0.811278 − 0.5
    assert sc.binary_mi_bits([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.8112781245 - 0.5, abs=1e-9)


def test_conditional_mi_removes_what_the_modality_explains():
    m = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    text_expert = m == 1
    red_word = np.array([0, 0, 0, 0, 1, 0, 1, 0], bool)  # only text tokens are words
    assert sc.binary_mi_bits(text_expert, red_word) > 0.3
    assert sc.conditional_mi_bits(text_expert, red_word, m) == pytest.approx(0.0, abs=1e-12)
    red_expert = red_word.copy()
    assert sc.conditional_mi_bits(red_expert, red_word, m) == pytest.approx(0.5)  # p(text)·H(½) = ½ bit


def test_expert_concept_mi_and_specialists():
    m = np.array([0] * 8 + [1] * 8)
    concept = np.zeros((16, 1), bool)
    concept[[0, 1, 8, 9], 0] = True  # "red": two image patches, two words
    routed = np.zeros((16, 2), bool)
    routed[:, 0] = m == 1  # expert 0: text
    routed[:, 1] = concept[:, 0]  # expert 1: red, in both modalities
    out = sc.expert_concept_mi(routed, concept, m)
    assert out["u_modality"][0] == pytest.approx(1.0) and out["cmi"][0][0] == pytest.approx(0.0, abs=1e-12)
    assert out["cu"][1][0] == pytest.approx(1.0) and out["u_modality"][1] == pytest.approx(0.0, abs=1e-12)
    assert sc.specialists(out, ["colour:red"]) == [(1, "colour:red", pytest.approx(1.0), pytest.approx(0.0, abs=1e-12))]


def test_word_and_patch_concepts():
    assert sc.word_concepts(["", "a", "small", "red", "circle", "left", "of", "a", "blue", "square", ""]) == [
        None, None, "size:small", "colour:red", "shape:circle", "relation:left of", "relation:left of", None,
        "colour:blue", "shape:square", None]
    meta = {"objects": [{"shape": "square", "colour": "red", "size": "large", "cx": 0.25, "cy": 0.25}]}
    patches = sc.patch_concepts(meta, 32, 8)
    assert patches[0] == {"colour:red", "shape:square", "size:large"}  # top-left patch inside the square
    assert patches[15] == set()  # bottom-right corner: background
