"""The layerfs union filesystem (FUSE)."""
