"""Demo seed for `mlregfs serve --init-demo`: public project demo/models with sample models.

Content is generated from seeded PRNGs, so sha256s are identical on every machine.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

from mlregfs.server.store import Store

DEMO_PROJECT = "demo/models"


def _blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def safetensors(seed: int, tensors: dict[str, tuple[int, ...]]) -> bytes:
    """A valid safetensors file of float32 tensors (header: u64 length + JSON, then data)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", "generator": "mlregfs demo"}}
    offset = 0
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw + _blob(seed, offset)


def seed_demo(store: Store) -> bool:
    """Create the demo project unless it exists; returns True when it seeded."""
    if store.project(DEMO_PROJECT) is not None:
        return False
    p = store.create_project(DEMO_PROJECT, "public")

    store.create_model(p, "llama-tiny", description="A tiny llama-shaped model for demos")
    config = (
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 256,
                "num_hidden_layers": 4,
                "vocab_size": 1024,
            },
            indent=2,
        ).encode()
        + b"\n"
    )
    tokenizer = (
        json.dumps(
            {
                "version": "1.0",
                "model": {"type": "BPE", "vocab": {f"tok{i}": i for i in range(64)}},
            },
            indent=1,
        ).encode()
        + b"\n"
    )
    for i, version in enumerate(("1.0.0", "1.1.0", "2.0.0-rc.1")):
        v = store.create_version(p, "llama-tiny", version)
        store.add_file(p, v, "config.json", config)
        store.add_file(p, v, "tokenizer/tokenizer.json", tokenizer)
        weights = safetensors(
            100 + i,
            {
                "model.embed_tokens.weight": (1024, 256),
                "model.layers.0.mlp.up_proj.weight": (1024, 512),
                "lm_head.weight": (1024, 256),
            },
        )
        store.add_file(p, v, "model.safetensors", weights)

    store.create_model(p, "team/bert-small")
    v = store.create_version(p, "team/bert-small", "0.1.0")
    store.add_file(p, v, "weights.bin", _blob(200, 1 << 20))
    store.add_file(p, v, "README.md", b"# bert-small\n\nA demo model with a nested name.\n")

    store.create_model(p, "vision/resnet50")
    v = store.create_version(p, "vision/resnet50", "3.2.1")
    store.add_file(p, v, "weights/resnet50.pth", _blob(300, 2 << 20))
    store.add_file(p, v, "labels.txt", "".join(f"class_{i}\n" for i in range(1000)).encode())

    iid = store.create_candidate(p, model="llama-tiny", name="demo-run")
    store.add_file(p, f"candidate:{iid}", "metrics.json", b'{"loss": 0.42, "accuracy": 0.87}\n')
    store.add_file(p, f"candidate:{iid}", "model/checkpoint.bin", _blob(400, 512 << 10))

    token = store.create_token(p, "maintainer")
    path = Path(store.data_dir) / "demo-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return True
