"""HTTP plumbing of the GitLab client, with no GitLab routes in it: the byte transport
(transport.py over lean.py and threaded.py), JSON over httpx (rest.py), the retry loop
(retrying.py), and errors.py, the one place an HTTP status, a socket error or an httpx
exception becomes an mlregfs.errors type."""
