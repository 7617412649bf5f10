"""config/: the seed's example sources register and render as the seed shows; the
settings example names only real settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.lifecycle import resolve_names
from proxy.settings import Settings
from proxy.source_spec import DataSourceSpec
from proxy.templates import compile_source, render

CONFIG = Path(__file__).parent.parent / "config"

SEED = {
    "github_user_api": (
        {"username": "octocat"},
        {"github_token": "abc123token"},
        (
            "GET",
            "https://api.github.com/users/octocat",
            (("Authorization", "token abc123token"), ("Accept", "application/vnd.github.v3+json")),
            None,
        ),
    ),
    "product_catalog": ({}, {}, ("GET", "https://data.company.com/products.csv", (), None)),
    "legacy_soap_api": (
        {},
        {},
        (
            "POST",
            "https://legacy.system.com/soap",
            (("Content-Type", "text/xml"), ("SOAPAction", "GetCustomer")),
            b"<soap:Envelope>...</soap:Envelope>",
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(SEED))
def test_seed_example_renders_as_the_seed_shows(name: str) -> None:
    spec = DataSourceSpec.model_validate_json((CONFIG / "sources" / f"{name}.json").read_text())
    params, variables, expected = SEED[name]
    runtime_params, variable_names = resolve_names(spec)
    assert (sorted(runtime_params), sorted(variable_names)) == (sorted(params), sorted(variables))
    rendered = render(
        compile_source(spec.source, runtime_params, variable_names), params, variables
    )
    assert (rendered.method, rendered.url, rendered.headers, rendered.content) == expected


def test_settings_example_names_only_real_settings() -> None:
    names: list[str] = []
    for line in (CONFIG / "databroker.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            names.append(line.split("=", 1)[0])
    fields: dict[str, Any] = Settings.model_fields
    assert names, "the example lists no setting"
    assert [n for n in names if n.removeprefix("DATABROKER_").lower() not in fields] == []
