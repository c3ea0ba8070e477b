"""Import fastai with its import-time FutureWarning silenced: fastai.layers decorates functions with
`torch.jit.script`, which torch 2.14 deprecates, so every notebook that trains printed the warning once.
Import this module before any `fastai` import; nothing else is filtered, and only during that import."""
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
    import fastai.basics  # noqa: F401
