class ExportError(ValueError):
    """A one-line, user-facing reason why an export cannot go on, and what to do instead."""
