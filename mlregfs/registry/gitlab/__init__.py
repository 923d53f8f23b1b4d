"""The GitLab client, split by operation (as mountpoint-s3's s3_crt_client/<op>.rs):
client.py composes project.py, listing.py, files.py, transfer.py and admin.py over one
api.py session; pages.py pages listings and decode.py reads their rows. HTTP itself (bytes,
JSON, retries, error mapping) is in mlregfs.registry.http.

Routes and quirks follow /work/shared/reference/gitlab-api.md; the section numbers cited in
comments (§5, §7, ...) refer to it.
"""

from mlregfs.registry.gitlab.client import GitLabRegistry
from mlregfs.registry.gitlab.files import decode_file_name
from mlregfs.registry.gitlab.transfer import signed_url_lifetime

__all__ = ["GitLabRegistry", "decode_file_name", "signed_url_lifetime"]
