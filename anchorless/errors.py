"""The errors a user can act on, shared by the platform, the cluster and the command line.

Each carries one clear message naming the file, the record and the problem; the
command line prints it as one line and exits non-zero instead of a traceback.
"""


class AnchorlessError(Exception):
    """Base of every error meant for the user rather than for a debugger."""


class DataError(AnchorlessError):
    """Input data (COCO JSON, images, shards, manifests) that cannot be used."""


class ModelError(AnchorlessError):
    """A model that cannot be loaded or does not fit the data (file, URI, categories)."""
