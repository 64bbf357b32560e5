"""python -m export: export a Keras classifier with in-graph CAM / Grad-CAM signatures."""

from __future__ import annotations

import sys

from .options import parse_args


def main(argv: list[str] | None = None) -> int:
    from .verify import VerificationError

    try:
        options = parse_args(argv, prog="python -m export", description=__doc__)
        from .pipeline import export_savedmodel  # Keras: once the flags are good

        export_savedmodel(options)
    except (ValueError, FileNotFoundError, FileExistsError, VerificationError) as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
