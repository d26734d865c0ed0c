"""EM, variational Bayes (CAVI) and stochastic VI as natural-gradient steps on exponential
families: the M-step identities (``core``), the EM fits (``fits``), the variational fits
(``vb``) and their input checks (``checks``). May import ``ngvi.errors`` and ``ngvi.families``;
it never imports the bundled ``models``."""

from ngvi.em.core import *  # noqa: F403
from ngvi.em.core import __all__ as _core_all
from ngvi.em.fits import *  # noqa: F403
from ngvi.em.fits import __all__ as _fits_all
from ngvi.em.vb import *  # noqa: F403
from ngvi.em.vb import __all__ as _vb_all

__all__ = [*_core_all, *_fits_all, *_vb_all]
