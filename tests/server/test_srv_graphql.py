"""GraphQL mutations the server implements because GitLab offers no REST route for them."""

from __future__ import annotations

import httpx

from tests.server.helpers import World, bearer

DELETE_VERSION = """
mutation($id: MlModelVersionID!) {
  mlModelVersionDelete(input: {id: $id}) { modelVersion { id } errors }
}"""


def _delete_version(world: World, token: str | None, gid: str) -> httpx.Response:
    return httpx.post(
        f"{world.server.url}/api/graphql",
        json={"query": DELETE_VERSION, "variables": {"id": gid}},
        headers=bearer(token),
    )


def test_delete_version_needs_developer(world: World) -> None:
    st = world.server.store
    vid = st.create_version(world.priv.id, "m", "7.0.0")
    gid = f"gid://gitlab/Ml::ModelVersion/{vid}"
    for role in ("reporter", "outsider"):
        r = _delete_version(world, world.priv.tokens[role], gid)
        assert r.status_code == 200
        body = r.json()
        assert body["data"] == {"mlModelVersionDelete": None}
        assert "don't have permission" in body["errors"][0]["message"]
    assert st.version(world.priv.id, vid) is not None
    r = _delete_version(world, world.priv.tokens["developer"], gid)
    assert r.json() == {
        "data": {"mlModelVersionDelete": {"modelVersion": {"id": gid}, "errors": []}}
    }
    assert st.version(world.priv.id, vid) is None
    # its package no longer lists
    pkgs = httpx.get(
        f"{world.api}/projects/{world.priv.id}/packages",
        params={"package_version": "7.0.0"},
        headers={"PRIVATE-TOKEN": world.priv.tokens["developer"]},
    ).json()
    assert pkgs == []


def test_delete_missing_version_and_bad_token(world: World) -> None:
    r = _delete_version(
        world, world.priv.tokens["developer"], "gid://gitlab/Ml::ModelVersion/424242"
    )
    assert r.json() == {
        "data": {
            "mlModelVersionDelete": {"modelVersion": None, "errors": ["Model version not found"]}
        }
    }
    r = _delete_version(world, "glpat-not-a-token", "gid://gitlab/Ml::ModelVersion/1")
    assert r.status_code == 401
