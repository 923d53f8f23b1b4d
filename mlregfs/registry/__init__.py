"""Remote layer: knows GitLab and HTTP, knows nothing about inodes or FUSE.

The Protocol is `base.Registry`; the value types are in `types`.
"""
