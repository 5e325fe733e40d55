"""Which seed drives what, in one place.

An experiment compares arms over seeds. What must stay fixed across its seeds is keyed on ``data.seed``: the
problem split (train / pairs / validation / test), the detector pairs and hence the real hack subspace V, and the
teacher pool (``data.pool_seed``). Everything that is a draw of the run follows the run seed
(``seed_everything``): the sampling stream, the prompt order, the teacher draws and the control subspaces
(random, shuffled), so that seeds replicate the whole run and not only its sampling.
"""

from __future__ import annotations

import os


def run_seed() -> int:
    """The run's ``seed_everything`` value (Lightning exports it as ``PL_GLOBAL_SEED``; 0 when nothing seeded)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
