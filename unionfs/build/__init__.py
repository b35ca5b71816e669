"""``layerfs build``: images built from a Dockerfile, each step a container on the union
mount and a commit (see builder.py).

It lives in unionfs/ because it runs containers on the union mount (unionfs.mount) and
so sits above both the store and the mount lifecycle; a top-level ``build/`` package
would take the import name of PyPA's ``build`` and the directory setuptools writes its
build output to (and .gitignore ignores).
"""
