"""Packages and package-file REST API: entities, pagination headers, filters, deletes."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.server.helpers import World, bearer, files_url


@pytest.fixture(scope="module")
def many(world: World) -> tuple[int, int]:
    """A version with 150 files (more than one page of 100)."""
    st = world.server.store
    p = world.priv
    st.create_model(p.id, "many")
    vid = st.create_version(p.id, "many", "1.0.0")
    for i in range(150):
        st.add_file(p.id, vid, f"shards/part-{i:03d}.bin", bytes([i]))
    v = st.version(p.id, vid)
    assert v is not None
    return vid, int(v["package_id"])


def test_project_entity(world: World, client: httpx.Client) -> None:
    r = client.get(f"{world.api}/projects/acme%2Fpub")
    assert r.status_code == 200
    e = r.json()
    assert (e["id"], e["path_with_namespace"], e["visibility"], e["name"]) == (
        world.pub.id,
        "acme/pub",
        "public",
        "pub",
    )
    assert e["web_url"] == f"{world.server.url}/acme/pub"
    assert client.get(f"{world.api}/projects/{world.pub.id}").json()["id"] == world.pub.id
    r = client.get(f"{world.api}/projects/acme%2Fpriv")
    assert (r.status_code, r.json()) == (404, {"message": "404 Project Not Found"})
    r = client.get(
        f"{world.api}/projects/acme%2Fpriv", headers={"PRIVATE-TOKEN": world.priv.tokens["guest"]}
    )
    assert r.status_code == 200
    assert r.json()["permissions"]["project_access"]["access_level"] == 10
    r = client.get(f"{world.api}/projects/acme%2Fpriv", headers={"PRIVATE-TOKEN": "nope"})
    assert (r.status_code, r.json()) == (401, {"message": "401 Unauthorized"})
    # job tokens are not accepted on the projects API: anonymous, hence 404 for private
    r = client.get(
        f"{world.api}/projects/acme%2Fpriv", headers={"JOB-TOKEN": world.priv.tokens["job"]}
    )
    assert r.status_code == 404


def test_package_files_pagination(
    world: World, client: httpx.Client, many: tuple[int, int]
) -> None:
    _, pkg = many
    h = {"PRIVATE-TOKEN": world.priv.tokens["reporter"]}
    url = f"{world.api}/projects/{world.priv.id}/packages/{pkg}/package_files"
    r = client.get(url, headers=h)
    assert len(r.json()) == 20
    assert (
        r.headers["x-per-page"],
        r.headers["x-page"],
        r.headers["x-next-page"],
        r.headers["x-prev-page"],
        r.headers["x-total"],
        r.headers["x-total-pages"],
    ) == ("20", "1", "2", "", "150", "8")
    r = client.get(url, params={"per_page": 500, "page": 2}, headers=h)
    body = r.json()
    assert len(body) == 50
    assert r.headers["x-per-page"] == "100"
    assert r.headers["x-next-page"] == ""
    assert r.headers["x-prev-page"] == "1"
    assert r.headers["x-total-pages"] == "2"
    rels = re.findall(r'<([^>]+)>; rel="(\w+)"', r.headers["link"])
    assert [rel for _, rel in rels] == ["prev", "first", "last"]
    assert "page=1" in rels[0][0] and "per_page=100" in rels[0][0]
    assert body[-1]["file_name"] == "shards%2Fpart-149.bin"
    f = body[0]
    assert set(f) == {
        "id",
        "package_id",
        "created_at",
        "file_name",
        "size",
        "file_md5",
        "file_sha1",
        "file_sha256",
    }
    assert (f["file_md5"], f["file_sha1"], f["size"], f["package_id"]) == (None, None, 1, pkg)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", f["created_at"])
    r = client.get(url, params={"order_by": "file_name", "sort": "desc", "per_page": 1}, headers=h)
    assert r.json()[0]["file_name"] == "shards%2Fpart-149.bin"
    r = client.get(url, params={"page": 99}, headers=h)
    assert (r.json(), r.headers["x-next-page"], r.headers["x-prev-page"]) == ([], "", "")
    r = client.get(url, params={"order_by": "size"}, headers=h)
    assert (r.status_code, r.json()) == (400, {"error": "order_by does not have a valid value"})
    r = client.get(url, params={"page": "x"}, headers=h)
    assert (r.status_code, r.json()) == (400, {"error": "page is invalid"})


def test_packages_list_filters(world: World, client: httpx.Client, many: tuple[int, int]) -> None:
    h = {"PRIVATE-TOKEN": world.priv.tokens["reporter"]}
    url = f"{world.api}/projects/{world.priv.id}/packages"
    r = client.get(url, params={"package_type": "ml_model", "package_name": "an"}, headers=h)
    assert [(x["name"], x["version"]) for x in r.json()] == [("many", "1.0.0")]  # fuzzy
    r = client.get(url, params={"package_name": "M", "package_version": "1.0.0"}, headers=h)
    assert sorted(x["name"] for x in r.json()) == ["m", "many"]  # case-insensitive substring
    r = client.get(url, params={"package_type": "npm"}, headers=h)
    assert r.json() == []
    r = client.get(url, params={"package_type": "bogus"}, headers=h)
    assert (r.status_code, r.json()) == (400, {"error": "package_type does not have a valid value"})
    e = client.get(url, params={"package_name": "many"}, headers=h).json()[0]
    assert e["package_type"] == "ml_model" and e["status"] == "default"
    assert "delete_api_path" not in e["_links"]  # reporters may not delete
    # job token via JOB-TOKEN works on the packages API
    r = client.get(url, headers={"JOB-TOKEN": world.priv.tokens["job"]})
    assert r.status_code == 200
    r = client.get(url, headers={"Authorization": f"Bearer {world.priv.tokens['reporter']}"})
    assert r.status_code == 200


def test_single_package_has_versions(world: World, client: httpx.Client) -> None:
    p = world.pub
    st = world.server.store
    st.create_model(p.id, "vv")
    a = st.create_version(p.id, "vv", "1.0.0")
    b = st.create_version(p.id, "vv", "1.1.0")
    pa = st.version(p.id, a)["package_id"]  # type: ignore[index]
    pb = st.version(p.id, b)["package_id"]  # type: ignore[index]
    r = client.get(f"{world.api}/projects/{p.id}/packages/{pa}")
    e = r.json()
    assert (e["id"], e["name"], e["version"]) == (pa, "vv", "1.0.0")
    assert [v["id"] for v in e["versions"]] == [pb]
    r = client.get(
        f"{world.api}/projects/{world.priv.id}/packages/{pa}",
        headers={"PRIVATE-TOKEN": world.priv.tokens["maintainer"]},
    )
    assert (r.status_code, r.json()) == (404, {"message": "404 Not found"})  # other project


def test_delete_file_needs_maintainer(world: World, client: httpx.Client) -> None:
    p = world.priv
    st = world.server.store
    fid = st.add_file(p.id, p.version_id, "del/me.bin", b"bye")
    url = f"{world.api}/projects/{p.id}/packages/{p.package_id}/package_files/{fid}"
    r = client.delete(url, headers={"PRIVATE-TOKEN": p.tokens["developer"]})
    assert (r.status_code, r.json()) == (403, {"message": "403 Forbidden"})
    r = client.delete(url, headers={"PRIVATE-TOKEN": p.tokens["maintainer"]})
    assert (r.status_code, r.content) == (204, b"")
    r = client.delete(url, headers={"PRIVATE-TOKEN": p.tokens["maintainer"]})
    assert (r.status_code, r.json()) == (404, {"message": "404 Not Found"})
    r = client.get(
        files_url(world, p, p.version_id, "del/me.bin"), headers=bearer(p.tokens["developer"])
    )
    assert r.status_code == 404


def test_download_by_file_id(world: World, client: httpx.Client) -> None:
    p = world.priv
    st = world.server.store
    st.add_file(p.id, p.version_id, "byid.txt", b"one")
    fid = st.add_file(p.id, p.version_id, "byid.txt", b"two")
    old = fid - 1
    base = f"{world.api}/projects/{p.id}/packages/{p.package_id}/package_files"
    h = {"PRIVATE-TOKEN": p.tokens["reporter"]}
    assert client.get(f"{base}/{old}/download", headers=h).content == b"one"
    r = client.get(f"{base}/{fid}/download", headers=h, params={})
    assert r.content == b"two"
    assert r.headers["content-disposition"].startswith('attachment; filename="byid.txt"')
    assert client.get(f"{base}/{fid}/download").status_code == 404  # anonymous, private


def test_delete_package(world: World, client: httpx.Client) -> None:
    p = world.priv
    st = world.server.store
    vid = st.create_version(p.id, "m", "9.0.0")
    pkg = st.version(p.id, vid)["package_id"]  # type: ignore[index]
    url = f"{world.api}/projects/{p.id}/packages/{pkg}"
    assert client.delete(url, headers={"PRIVATE-TOKEN": p.tokens["developer"]}).status_code == 403
    assert client.delete(url, headers={"PRIVATE-TOKEN": p.tokens["maintainer"]}).status_code == 204
    assert client.get(url, headers={"PRIVATE-TOKEN": p.tokens["maintainer"]}).status_code == 404


def test_unknown_route(world: World, client: httpx.Client) -> None:
    for path in ("/api/v4/nope", "/api/v4/projects/1/x", "/api/v4/projects/1/packages/1/y"):
        r = client.get(world.server.url + path)
        assert (r.status_code, r.json()) == (404, {"error": "404 Not Found"}), path
    r = client.get(f"{world.api}/projects/1/packages/ml_models")  # matches :package_id
    assert (r.status_code, r.json()) == (400, {"error": "package_id is invalid"})
