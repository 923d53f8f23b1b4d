"""Import rules between the layers (README Development), checked on the source with `ast`.

A rule names a package (or module) and the imports it must not make, directly or inside a
function. Third-party transport and kernel libraries are allowed in one layer each.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "mlregfs"

# module prefix -> forbidden import prefixes
RULES: dict[str, tuple[str, ...]] = {
    # caches know nothing of HTTP, the kernel or the filesystem semantics
    "mlregfs.cache": (
        "httpx", "httpcore", "pyfuse3", "mlregfs.registry.gitlab", "mlregfs.registry.http",
        "mlregfs.registry.catalog", "mlregfs.fs", "mlregfs.fuse_ops", "mlregfs.mount",
        "mlregfs.server",
    ),
    # the semantic core is kernel-free and programs against the Registry protocol
    "mlregfs.fs": (
        "httpx", "httpcore", "pyfuse3", "mlregfs.fuse_ops", "mlregfs.mount", "mlregfs.server",
        "mlregfs.registry.gitlab", "mlregfs.registry.http", "mlregfs.registry.catalog",
    ),
    # GitLab's naming rules: pure, shared by the core and the tools
    "mlregfs.names": (
        "httpx", "httpcore", "pyfuse3", "mlregfs.fs", "mlregfs.cache", "mlregfs.fuse_ops",
        "mlregfs.mount", "mlregfs.server", "mlregfs.registry.gitlab",
        "mlregfs.registry.http", "mlregfs.registry.catalog",
    ),
    # the registry client speaks HTTP and knows nothing of the filesystem
    "mlregfs.registry": (
        "pyfuse3", "mlregfs.fs", "mlregfs.cache", "mlregfs.fuse_ops", "mlregfs.mount",
        "mlregfs.server",
    ),
    # GitLab's operations speak HTTP only through registry/http (bytes, JSON, error mapping)
    "mlregfs.registry.gitlab": ("httpx", "httpcore", "http.client", "socket"),
    # the harness starts real processes (serve, mounts): it needs none of the client's code
    "mlregfs.testing": (
        "pyfuse3", "httpx", "mlregfs.fs", "mlregfs.cache", "mlregfs.registry",
        "mlregfs.fuse_ops", "mlregfs.mount",
    ),
    # the embedded server is an independent oracle: nothing of the client
    "mlregfs.server": (
        "pyfuse3", "mlregfs.fs", "mlregfs.cache", "mlregfs.registry", "mlregfs.fuse_ops",
        "mlregfs.mount", "mlregfs.spool", "mlregfs.config",
    ),
}  # fmt: skip
# the adapter forwards to the core: these are all it may import from mlregfs
ADAPTER_ALLOWED = ("mlregfs.errors", "mlregfs.fs.core")
# third-party libraries confined to one layer
CONFINED = {
    "httpx": ("mlregfs.registry", "mlregfs.server"),
    "pyfuse3": ("mlregfs.fuse_ops", "mlregfs.mount"),
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = {_module(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module: str) -> None:
    imports = MODULES[module]
    bad = [
        name
        for layer, forbidden in RULES.items()
        if _under(module, layer)
        for name in imports
        if any(_under(name, f) for f in forbidden)
    ]
    for lib, homes in CONFINED.items():
        if not any(_under(module, h) for h in homes):
            bad += [n for n in imports if _under(n, lib)]
    if module == "mlregfs.fuse_ops":
        bad += [
            n
            for n in imports
            if _under(n, "mlregfs") and not any(_under(n, a) for a in ADAPTER_ALLOWED)
        ]
    assert not bad, f"{module} imports across the layers: {sorted(set(bad))}"


def test_the_rules_see_the_tree() -> None:
    # a rule that matches no module checks nothing
    for layer in [*RULES, *ADAPTER_ALLOWED]:
        assert any(_under(m, layer) for m in MODULES), layer
    assert "httpx" in MODULES["mlregfs.registry.http.rest"]  # the parser sees imports
