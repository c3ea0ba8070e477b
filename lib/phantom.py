"""Built-in synthetic data in the exact Kaggle layout: `python -m lib.phantom [TASK] --out DIR [options]`.

TASK (default `ich`) picks the task's generator; the options are the generator's (`python -m lib.phantom TASK -h`).
"""
import sys
from typing import Optional, Sequence

from lib.tasks import get_task, task_names


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    name = "ich"
    if args and not args[0].startswith("-"):
        name = args.pop(0)
    try:
        spec = get_task(name)
    except KeyError:
        print(f"error: unknown task {name!r}; tasks: {', '.join(task_names())}", file=sys.stderr)
        return 2
    try:
        return spec.phantom_main(args)
    except (ValueError, FileExistsError) as exc:  # bad options or a foreign output folder: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
