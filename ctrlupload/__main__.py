"""``python -m ctrlupload``: the same as the ``ctrlupload`` command."""

from ._cli import main

raise SystemExit(main())
