"""``python -m cancellable``: the command-line entry point (``demo``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``python -m cancellable <command>``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m cancellable demo [--broker URL] [--backend URL] [--keep]")
        print("\n  demo   dispatch real tasks to a real worker, cancel them, show the events")
        return 0 if args else 2
    if args[0] == "demo":
        try:
            from ._demo import main as demo
        except ImportError as exc:
            if (exc.name or "").partition(".")[0] != "celery":
                raise
            print(
                "the demo runs a real Celery worker, and Celery is not installed: "
                "pip install 'cancellable[celery]'",
                file=sys.stderr,
            )
            return 1
        return demo(args[1:])
    print(f"unknown command {args[0]!r}; try: python -m cancellable demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
