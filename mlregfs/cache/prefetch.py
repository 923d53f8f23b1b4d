"""Which files are fetched whole as soon as they are opened (`-o prefetch=`).

Model servers load weights through the page cache (vLLM, transformers and safetensors mmap
the file or read it tensor by tensor in their own order) and never read ahead of a FUSE mount
themselves, so the mount streams a weights file whole, at sequential speed, the moment it is
opened; other files are fetched as they are read.
"""

from __future__ import annotations

# `weights`: files whose suffix says model weights (the default); `all`: every file;
# `off`: none (read-ahead and the dense-access detection still apply)
PREFETCH_POLICIES = ("weights", "all", "off")

WEIGHT_SUFFIXES = frozenset(
    {
        ".safetensors",
        ".gguf",
        ".ggml",
        ".bin",
        ".pt",
        ".pth",
        ".onnx",
        ".ckpt",
        ".h5",
        ".keras",
        ".pb",
        ".tflite",
        ".npz",
        ".npy",
        ".msgpack",
        ".model",
        ".mlmodel",
        ".joblib",
        ".pkl",
        ".engine",
        ".plan",
        ".nemo",
        ".mar",
    }
)


def wants_prefetch(policy: str, name: str) -> bool:
    """Should a file called `name` be streamed whole when it is opened under `policy`?"""
    if policy == "all":
        return True
    if policy != "weights":
        return False
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in WEIGHT_SUFFIXES
