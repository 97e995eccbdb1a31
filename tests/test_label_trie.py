"""The label trie: how label probabilities come from next-token log-probabilities."""

from __future__ import annotations

import math

import pytest

from adapter_contract.labels import LabelTrie

# Labels as token sequences: 1-2-3 and 1-2-4 share two tokens, 1-5 shares one, 6 stands alone.
TRIE = LabelTrie([(1, 2, 3), (1, 2, 4), (1, 5), (6,)])


def logprobs(**p: float) -> dict[int, float]:
    return {int(token[1:]): math.log(v) for token, v in p.items()}


def test_branch_nodes_are_the_real_choices_in_breadth_first_order() -> None:
    assert [(n.prefix, n.children) for n in TRIE.branches] == [((), (1, 6)), ((1,), (2, 5)), ((1, 2), (3, 4))]


def test_distribution_multiplies_the_choices_along_each_label() -> None:
    found = {(): logprobs(t1=0.8, t6=0.2), (1,): logprobs(t2=0.5, t5=0.5), (1, 2): logprobs(t3=0.25, t4=0.75)}
    assert TRIE.distribution(found) == pytest.approx([0.1, 0.3, 0.4, 0.2])


def test_resolve_decides_what_the_known_nodes_decide_and_bounds_the_rest() -> None:
    probs, pending = TRIE.resolve({(): logprobs(t1=0.8, t6=0.2)})
    assert probs == [None, None, None, pytest.approx(0.2)]
    assert pending == {(1,): pytest.approx(0.8)}
    probs, pending = TRIE.resolve({(): logprobs(t1=0.8, t6=0.2), (1,): logprobs(t2=0.5, t5=0.5)})
    assert probs == [None, None, pytest.approx(0.4), pytest.approx(0.2)]
    assert pending == {(1, 2): pytest.approx(0.4)}


def test_distribution_refuses_to_guess_a_missing_node() -> None:
    with pytest.raises(KeyError):
        TRIE.distribution({(): logprobs(t1=0.8, t6=0.2)})


def test_branches_under_a_prefix() -> None:
    assert [n.prefix for n in TRIE.branches_under((1,))] == [(1,), (1, 2)]
    assert [n.prefix for n in TRIE.branches_under(())] == [(), (1,), (1, 2)]
