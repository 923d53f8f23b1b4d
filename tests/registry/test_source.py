"""SOURCE URL parsing: the splits GitLabRegistry will try, and the URLs it must refuse."""

from __future__ import annotations

import pytest

from mlregfs.registry.source import SourceSplit, candidates


@pytest.mark.parametrize(
    "source",
    [
        "https://gitlab.com/group/proj",
        "https://gitlab.com/group/proj/",
        "https://gitlab.com/group/proj.git",
        "https://gitlab.com/group/proj/-/ml/models",
        "https://gitlab.com/group/proj/-/ml/models/3/versions/9",
        "https://gitlab.com/group/proj?tab=readme#top",
        "  https://gitlab.com/group/proj  ",
    ],
)
def test_path_url_with_tolerated_noise(source: str) -> None:
    assert candidates(source) == [SourceSplit("https://gitlab.com/api/v4", "group%2Fproj")]


def test_subgroups_give_one_split_per_possible_relative_root() -> None:
    assert candidates("https://host:8443/gitlab/a/b/proj") == [
        SourceSplit("https://host:8443/api/v4", "gitlab%2Fa%2Fb%2Fproj"),
        SourceSplit("https://host:8443/gitlab/api/v4", "a%2Fb%2Fproj"),
        SourceSplit("https://host:8443/gitlab/a/api/v4", "b%2Fproj"),
    ]


def test_http_allowed_and_scheme_host_lowercased_only_where_safe() -> None:
    assert candidates("HTTP://127.0.0.1:5000/ns/my.proj") == [
        SourceSplit("http://127.0.0.1:5000/api/v4", "ns%2Fmy.proj")
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("https://h/api/v4/projects/42", SourceSplit("https://h/api/v4", "42")),
        ("https://h/api/v4/projects/42/", SourceSplit("https://h/api/v4", "42")),
        ("https://h/api/v4/projects/42/ml/mlflow", SourceSplit("https://h/api/v4", "42")),
        ("https://h/root/api/v4/projects/42", SourceSplit("https://h/root/api/v4", "42")),
        (
            "https://h/api/v4/projects/group%2Fsub%2Fproj",
            SourceSplit("https://h/api/v4", "group%2Fsub%2Fproj"),
        ),
        (
            "https://h/api/v4/projects/group%2fproj",  # lower-case escape is normalised
            SourceSplit("https://h/api/v4", "group%2Fproj"),
        ),
    ],
)
def test_api_url_gives_exactly_one_split(source: str, expected: SourceSplit) -> None:
    assert candidates(source) == [expected]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "empty"),
        ("gitlab.com/group/proj", "https:// or http://"),
        ("ftp://gitlab.com/group/proj", "https:// or http://"),
        ("https:///group/proj", "no host"),
        ("https://gitlab.com", "no project path"),
        ("https://gitlab.com/", "no project path"),
        ("https://gitlab.com/group", "group or user"),
        ("https://gitlab.com/-/ml/models", "no project path"),
        ("https://gitlab.com/api/v4/projects", "add the project ID"),
        ("https://gitlab.com/api/v4/projects/proj", "neither numeric"),
        ("https://gitlab.com/group/../proj", "cannot be part"),
        ("https://gitlab.com/group/pr%20oj", "cannot be part"),
    ],
)
def test_rejected_sources_say_why(source: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        candidates(source)


def test_credentials_in_url_rejected_without_echoing_them() -> None:
    with pytest.raises(ValueError) as info:
        candidates("https://oauth2:glpat-SECRET@gitlab.com/group/proj")
    assert "SECRET" not in str(info.value)
    assert "credentials" in str(info.value)
