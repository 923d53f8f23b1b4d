"""ml_models endpoints: the §7 status tables, validation, encodings, duplicates, Range, uploads."""

from __future__ import annotations

import hashlib
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.server.helpers import MAX_FILE_SIZE, World, bearer, files_url

# (role, private status, public status); None role = anonymous, "invalid" = unknown token
UPLOAD_TABLE = [
    ("developer", 201, 201),
    ("maintainer", 201, 201),
    ("job", 201, 201),
    ("guest", 403, 403),
    ("reporter", 403, 403),
    ("invalid", 401, 401),
    (None, 401, 401),
    ("outsider", 404, 403),
]
DOWNLOAD_TABLE = [
    ("developer", 200, 200),
    ("reporter", 200, 200),
    ("guest", 200, 200),  # private guest: the newer behaviour (allow_guest_plus_roles_to_pull)
    ("job", 200, 200),
    ("outsider", 404, 200),
    (None, 404, 200),
    ("invalid", 401, 401),
]


def _token(world: World, proj_name: str, role: str | None) -> str | None:
    proj = world.priv if proj_name == "priv" else world.pub
    if role is None:
        return None
    if role == "invalid":
        return "glpat-not-a-real-token-000"
    return proj.tokens[role]


def _body_for(status: int) -> dict[str, str]:
    return {
        201: {"message": "201 Created"},
        401: {"message": "401 Unauthorized"},
        403: {"message": "403 Forbidden"},
        404: {"message": "404 Project Not Found"},
    }[status]


@pytest.mark.parametrize("vis", ["priv", "pub"])
@pytest.mark.parametrize(("role", "priv_status", "pub_status"), UPLOAD_TABLE)
def test_upload_status_table(
    world: World,
    client: httpx.Client,
    vis: str,
    role: str | None,
    priv_status: int,
    pub_status: int,
) -> None:
    proj = world.priv if vis == "priv" else world.pub
    expected = priv_status if vis == "priv" else pub_status
    url = files_url(world, proj, proj.version_id, f"table/{role}.bin")
    r = client.put(url, content=b"x" * 10, headers=bearer(_token(world, vis, role)))
    assert r.status_code == expected, r.text
    assert r.json() == _body_for(expected)


@pytest.mark.parametrize("vis", ["priv", "pub"])
@pytest.mark.parametrize(("role", "priv_status", "pub_status"), UPLOAD_TABLE)
def test_authorize_status_table(
    world: World,
    client: httpx.Client,
    vis: str,
    role: str | None,
    priv_status: int,
    pub_status: int,
) -> None:
    proj = world.priv if vis == "priv" else world.pub
    expected = priv_status if vis == "priv" else pub_status
    expected = 200 if expected == 201 else expected
    url = files_url(world, proj, proj.version_id, "auth/never-stored.bin/authorize")
    r = client.put(url, headers=bearer(_token(world, vis, role)))
    assert r.status_code == expected, r.text
    if expected == 200:
        assert r.headers["content-type"] == "application/vnd.gitlab-workhorse+json"
        assert set(r.json()) == {"TempPath"}
    else:
        assert r.json() == _body_for(expected)
    files = world.server.store.files(proj.package_id)
    assert not [f for f in files if "never-stored" in f["file_name"]]


@pytest.mark.parametrize("vis", ["priv", "pub"])
@pytest.mark.parametrize(("role", "priv_status", "pub_status"), DOWNLOAD_TABLE)
def test_download_status_table(
    world: World,
    client: httpx.Client,
    vis: str,
    role: str | None,
    priv_status: int,
    pub_status: int,
) -> None:
    proj = world.priv if vis == "priv" else world.pub
    expected = priv_status if vis == "priv" else pub_status
    r = client.get(
        files_url(world, proj, proj.version_id, "hello.txt"),
        headers=bearer(_token(world, vis, role)),
    )
    assert r.status_code == expected, r.text
    if expected == 200:
        assert r.content == b"hello\n"
    else:
        assert r.json() == _body_for(expected)


def test_private_token_header_is_ignored(world: World, client: httpx.Client) -> None:
    p = world.priv
    tok = {"PRIVATE-TOKEN": p.tokens["developer"]}
    r = client.get(files_url(world, p, p.version_id, "hello.txt"), headers=tok)
    assert (r.status_code, r.json()) == (404, {"message": "404 Project Not Found"})
    r = client.put(files_url(world, p, p.version_id, "x.bin"), content=b"1", headers=tok)
    assert (r.status_code, r.json()) == (401, {"message": "401 Unauthorized"})
    q = world.pub
    r = client.get(
        files_url(world, q, q.version_id, "hello.txt"), headers={"PRIVATE-TOKEN": "garbage"}
    )
    assert r.status_code == 200  # ignored, so not even an invalid-token 401


def test_token_is_last_word_of_authorization(world: World, client: httpx.Client) -> None:
    p = world.priv
    url = files_url(world, p, p.version_id, "hello.txt")
    for value in (
        f"Token {p.tokens['reporter']}",
        p.tokens["reporter"],
        f"Bearer x {p.tokens['reporter']}",
    ):
        assert client.get(url, headers={"Authorization": value}).status_code == 200


def test_two_404_bodies(world: World, client: httpx.Client) -> None:
    p = world.priv
    h = bearer(p.tokens["developer"])
    r = client.get(files_url(world, p, p.version_id, "missing.bin"), headers=h)
    assert (r.status_code, r.json()) == (404, {"message": "404 Not found"})
    r = client.get(files_url(world, p, 999999, "hello.txt"), headers=h)
    assert (r.status_code, r.json()) == (404, {"message": "404 Not Found"})
    r = client.get(files_url(world, p, "candidate:99999", "hello.txt"), headers=h)
    assert (r.status_code, r.json()) == (404, {"message": "404 Not Found"})
    r = client.get(files_url(world, p, "abc", "hello.txt"), headers=h)
    assert (r.status_code, r.json()) == (404, {"message": "404 Not Found"})
    r = client.get(f"{world.api}/projects/nope%2Fnope/packages/ml_models/1/files/a.bin")
    assert (r.status_code, r.json()) == (404, {"message": "404 Project Not Found"})
    # missing model version on upload: 404 after auth
    r = client.put(files_url(world, p, 999999, "a.bin"), content=b"1", headers=h)
    assert (r.status_code, r.json()) == (404, {"message": "404 Not Found"})


@pytest.mark.parametrize(
    "raw_name",
    ["b%C3%A4d.bin", "a%2Fb.bin", "x%2C.bin", "x(1).bin", "%40x", "x%3Dy", "%25x", "..%2F.ssh"],
)
def test_file_name_invalid_before_auth(world: World, client: httpx.Client, raw_name: str) -> None:
    p = world.priv
    url = files_url(world, p, p.version_id, raw_name)
    for method in ("GET", "PUT"):
        r = client.request(method, url, content=b"1" if method == "PUT" else None)
        assert (r.status_code, r.json()) == (400, {"error": "file_name is invalid"}), raw_name
    r = client.put(url, content=b"1", headers={"Authorization": "Bearer invalid"})
    assert r.status_code == 400  # validation beats the invalid token


def test_path_traversal_rejected(world: World) -> None:
    p = world.priv
    for name in ("..", "."):
        with socket.create_connection(("127.0.0.1", world.server.port or 0), timeout=5) as s:
            path = urlsplit(files_url(world, p, p.version_id, f"dir/{name}")).path
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400"), data[:100]
        assert data.endswith(b'{"error":"file_name should be a valid file path"}')


def test_stored_names_are_encoded(world: World, client: httpx.Client) -> None:
    p = world.priv
    h = bearer(p.tokens["maintainer"])
    vid = world.server.store.create_version(p.id, "m", "7.0.0")
    for path in ("my_dir/model.bin", "Mo_de-l v12.md5", "a+b.bin", "d*~x/y z.bin"):
        raw = "/".join(
            httpx.URL("http://x/").copy_with(path="/" + seg).raw_path.decode()[1:]
            for seg in path.split("/")
        )
        url = files_url(world, p, vid, raw)
        assert client.put(url, content=path.encode(), headers=h).status_code == 201, path
        r = client.get(url, headers=h)
        assert r.content == path.encode()
    pkg = world.server.store.version(p.id, vid)
    assert pkg is not None
    r = client.get(
        f"{world.api}/projects/{p.id}/packages/{pkg['package_id']}/package_files",
        headers={"PRIVATE-TOKEN": p.tokens["maintainer"]},
    )
    assert [f["file_name"] for f in r.json()] == [
        "my_dir%2Fmodel.bin",
        "Mo_de-l%20v12.md5",
        "a%2Bb.bin",
        "d*%7Ex%2Fy%20z.bin",
    ]
    r = client.get(files_url(world, p, vid, "my_dir/model.bin"), headers=h)
    assert r.headers["content-disposition"].startswith('attachment; filename="my_dir%2Fmodel.bin"')
    assert r.headers["content-type"] == "application/octet-stream"


def test_duplicate_upload_two_rows_newest_served(world: World, client: httpx.Client) -> None:
    p = world.pub
    h = bearer(p.tokens["developer"])
    url = files_url(world, p, p.version_id, "dup/d.txt")
    assert client.put(url, content=b"first", headers=h).status_code == 201
    assert client.put(url, content=b"second!", headers=h).status_code == 201
    assert client.get(url).content == b"second!"
    rows = [f for f in world.server.store.files(p.package_id) if f["file_name"] == "dup%2Fd.txt"]
    assert [r["size"] for r in rows] == [5, 7]
    assert rows[1]["file_sha256"] == hashlib.sha256(b"second!").hexdigest()


def test_range_head_and_416(world: World, client: httpx.Client) -> None:
    p = world.pub
    data = bytes(range(256)) * 40  # 10240 bytes
    world.server.store.add_file(p.id, p.version_id, "r/data.bin", data)
    url = files_url(world, p, p.version_id, "r/data.bin")
    r = client.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206
    assert r.headers["content-range"] == "bytes 100-199/10240"
    assert r.headers["content-length"] == "100"
    assert r.content == data[100:200]
    r = client.get(url, headers={"Range": "bytes=-10"})
    assert (r.status_code, r.content) == (206, data[-10:])
    r = client.get(url, headers={"Range": "bytes=10000-"})
    assert r.headers["content-range"] == "bytes 10000-10239/10240"
    r = client.get(url, headers={"Range": "bytes=20000-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */10240"
    assert r.text == "invalid range: failed to overlap\n"
    r = client.get(url, headers={"Range": "bytes=5-1"})
    assert (r.status_code, r.text) == (416, "invalid range\n")
    r = client.get(url, headers={"Range": "bytes=0-1,4-5"})
    assert r.status_code == 206
    assert r.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert b"Content-Range: bytes 4-5/10240" in r.content
    assert int(r.headers["content-length"]) == len(r.content)
    r = client.head(url)
    assert r.status_code == 200
    assert r.headers["content-length"] == "10240"
    assert r.content == b""
    r = client.get(url, headers={"If-Modified-Since": r.headers["last-modified"]})
    assert r.status_code == 304


def test_short_body_upload_stores_nothing(world: World) -> None:
    p = world.priv
    tmp_dir = world.server.store.tmp_dir
    path = urlsplit(files_url(world, p, p.version_id, "short.bin")).path
    with socket.create_connection(("127.0.0.1", world.server.port or 0), timeout=5) as s:
        s.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {p.tokens['developer']}\r\n"
            "Content-Length: 100\r\n\r\n".encode()
            + b"y" * 50
        )
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
    assert not data.startswith(b"HTTP/1.1 201"), data
    files = world.server.store.files(p.package_id)
    assert not [f for f in files if f["file_name"] == "short.bin"]
    # the server notices the broken body asynchronously: give it a bounded moment to clean up
    deadline = time.monotonic() + 5
    while list(tmp_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_dir.iterdir()) == []


def test_size_limit_after_body(world: World, client: httpx.Client) -> None:
    p = world.priv
    h = bearer(p.tokens["developer"])
    url = files_url(world, p, p.version_id, "big.bin")
    r = client.put(url, content=b"z" * (MAX_FILE_SIZE + 1), headers=h)
    assert (r.status_code, r.json()) == (
        400,
        {"message": "400 Bad request - Artifact file is too large"},
    )
    assert client.get(url, headers=h).status_code == 404
    assert client.put(url, content=b"z" * MAX_FILE_SIZE, headers=h).status_code == 201
    assert len(client.get(url, headers=h).content) == MAX_FILE_SIZE


def test_hidden_status_upload(world: World, client: httpx.Client) -> None:
    p = world.priv
    st = world.server.store
    vid = st.create_version(p.id, "m", "8.0.0")
    pkg_id = st.version(p.id, vid)["package_id"]  # type: ignore[index]
    h = bearer(p.tokens["developer"])
    r = client.put(files_url(world, p, vid, "h.bin") + "?status=hidden", content=b"h", headers=h)
    assert r.status_code == 201
    r = client.put(files_url(world, p, vid, "h.bin") + "?status=bogus", content=b"h", headers=h)
    assert (r.status_code, r.json()) == (400, {"error": "status does not have a valid value"})
    api_h = {"PRIVATE-TOKEN": p.tokens["developer"]}
    listed = client.get(f"{world.api}/projects/{p.id}/packages", headers=api_h).json()
    assert pkg_id not in [x["id"] for x in listed]
    hidden = client.get(f"{world.api}/projects/{p.id}/packages?status=hidden", headers=api_h).json()
    assert [x["id"] for x in hidden] == [pkg_id]
    r = client.get(f"{world.api}/projects/{p.id}/packages/{pkg_id}", headers=api_h)
    assert (r.status_code, r.json()) == (404, {"message": "404 Not found"})
    r = client.get(f"{world.api}/projects/{p.id}/packages/{pkg_id}/package_files", headers=api_h)
    assert r.status_code == 404
    assert client.get(files_url(world, p, vid, "h.bin"), headers=h).content == b"h"


def test_candidate_package_created_lazily_even_by_get(world: World, client: httpx.Client) -> None:
    p = world.priv
    st = world.server.store
    iid = st.create_candidate(p.id, model="m")
    before = st.all("SELECT * FROM packages WHERE version=?", (f"candidate_{iid}",))
    assert before == []
    r = client.get(
        files_url(world, p, f"candidate:{iid}", "x.bin"), headers=bearer(p.tokens["developer"])
    )
    assert (r.status_code, r.json()) == (404, {"message": "404 Not found"})
    after = st.all("SELECT * FROM packages WHERE version=?", (f"candidate_{iid}",))
    assert [(x["name"], x["status"]) for x in after] == [("m", "default")]
    r = client.put(
        files_url(world, p, f"candidate:{iid}", "ck/p.bin"),
        content=b"c",
        headers=bearer(p.tokens["developer"]),
    )
    assert r.status_code == 201
    assert [f["file_name"] for f in st.files(after[0]["id"])] == ["ck%2Fp.bin"]


def test_read_api_scope(world: World, client: httpx.Client) -> None:
    p = world.priv
    h = bearer(p.tokens["read_api"])
    assert client.get(files_url(world, p, p.version_id, "hello.txt"), headers=h).status_code == 200
    r = client.put(files_url(world, p, p.version_id, "s.bin"), content=b"1", headers=h)
    assert r.status_code == 403
    assert r.json()["error"] == "insufficient_scope"


def test_method_not_allowed_and_trailing_slash(world: World, client: httpx.Client) -> None:
    p = world.pub
    r = client.post(files_url(world, p, p.version_id, "hello.txt"))
    assert (r.status_code, r.json()) == (405, {"error": "405 Not Allowed"})
    r = client.get(files_url(world, p, p.version_id, ""))
    assert (r.status_code, r.json()) == (404, {"error": "404 Not Found"})
