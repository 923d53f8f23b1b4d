"""mlregfs: mount a GitLab project's ML model registry as plain directories."""

__version__ = "0.1.0"
__all__ = ["__version__"]
