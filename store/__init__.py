"""The layerfs layer store: content-addressed blobs, an LMDB index, layers and images."""

from .errors import StoreError
from .store import Store, default_root

__all__ = ["Store", "StoreError", "default_root"]
