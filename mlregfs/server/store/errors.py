"""The store's refusals; each message is meant for humans (the admin CLI prints it)."""


class StoreError(Exception):
    """A store operation was refused; the message is meant for humans."""


class NotFoundError(StoreError):
    """The project, model, version, candidate or file does not exist."""


class ConflictError(StoreError):
    """The object already exists."""


class InvalidError(StoreError):
    """A name or version breaks GitLab's validation rules."""
