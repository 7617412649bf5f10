"""Masking secret values in what ``POST …/test`` echoes: every rendered form, the longest first."""

from __future__ import annotations

from urllib.parse import quote

from proxy.masking import MASK, MIN_ECHOED, forms, mask, mask_tree


def test_every_rendered_form_of_a_value_is_masked() -> None:
    secret = "k/y z+1&"
    secrets = forms([secret])
    url = f"https://api.example.com/{quote(secret, safe='/')}/x?key={quote(secret, safe='')}"
    assert mask(url, secrets) == f"https://api.example.com/{MASK}/x?key={MASK}"
    assert mask(f"Bearer {secret}", secrets) == f"Bearer {MASK}"
    assert mask("a=k%2Fy+z%2B1%26", secrets) == f"a={MASK}"  # form-encoded


def test_a_value_holding_another_is_masked_whole() -> None:
    secrets = forms(["abc", "abcdef"])
    assert mask("x-abcdef-abc", secrets) == f"x-{MASK}-{MASK}"


def test_non_strings_are_masked_as_the_templates_insert_them() -> None:
    secrets = forms([12345, True, None, ""])
    assert mask("n=12345&flag=true", secrets) == f"n={MASK}&flag={MASK}"


def test_a_tree_masks_strings_and_keys_not_numbers() -> None:
    secrets = forms(["s3cr3t"])
    tree = {"echo": ["s3cr3t", 7], "s3cr3t": {"n": 1.5}}
    assert mask_tree(tree, secrets) == {"echo": [MASK, 7], MASK: {"n": 1.5}}


def test_short_values_are_left_in_echoed_text_only_when_asked() -> None:
    secrets = forms(["eu"])
    assert mask("region eu", secrets) == f"region {MASK}"
    assert mask_tree({"r": "neutral eu"}, secrets, MIN_ECHOED) == {"r": "neutral eu"}
