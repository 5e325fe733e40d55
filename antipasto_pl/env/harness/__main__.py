"""The harness's entry script: ``python -I -S -B .../antipasto_pl/env/harness/__main__.py --serve|--run ...``.

How it loads its sibling modules: ``-I`` keeps this directory off sys.path, and importing
`antipasto_pl.env.harness` the usual way would run the trainer's package ``__init__`` files. So this
script registers its own directory (absolute, from ``__file__``) as a top-level package ``harness`` --
a bare module with that ``__path__`` -- and imports `server` from it: the modules find each other by
relative imports, exactly as when the trainer imports them as `antipasto_pl.env.harness`, and sys.path
stays the stdlib's. Every module is imported here, before the first sandbox: no view a sandbox runs in
(`view._python_view`) has this directory in it.
"""

import os
import sys
import types

if __name__ == "__main__":
    _package = types.ModuleType("harness")
    _package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules["harness"] = _package
    from harness.server import main

    main(sys.argv)
