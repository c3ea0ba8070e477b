"""The papermill runner: `python -m lib.run params/<task>/<run>.yaml --data DIR --out DIR` (see `runner`)."""
